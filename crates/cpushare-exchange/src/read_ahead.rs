//! A socket that reads ahead of the TLS layer on top of it.
//!
//! rustls asks its transport for at most 4 KiB at a time (its deframer's
//! `READ_SIZE`), so a TLS connection carrying a bulk transfer makes a system
//! call per 4 KiB however much has arrived. While a connection is busy,
//! [`ReadAhead`] reads up to [`AHEAD`] bytes per call and serves the TLS
//! layer's small reads from memory: in the relay bench (384 MiB each way)
//! the relay's socket reads fell from about 109,000 to 30,000, about one per
//! 64 KiB write of the other side. An idle or chatty connection (a read that does not fill what was
//! asked) reads straight into the caller's buffer and holds no buffer, so
//! 10,000 seller sessions cost no more memory than before.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use prost::bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read asks of the socket while a connection is busy (16 of
/// rustls's reads).
pub const AHEAD: usize = 64 << 10;

pub struct ReadAhead<T> {
    io: T,
    /// Read from the socket and not yet handed on. Its memory is kept while
    /// the connection is busy and given back when it is not.
    ahead: BytesMut,
    /// Whether the last read from the socket had more than was asked for.
    busy: bool,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> Self {
        ReadAhead { io, ahead: BytesMut::new(), busy: false }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.ahead.is_empty() {
            if !me.busy || out.remaining() >= AHEAD {
                // Straight into the caller's buffer. One that comes back full
                // says more is waiting: read ahead next time.
                ready!(Pin::new(&mut me.io).poll_read(cx, out))?;
                me.busy = out.remaining() == 0;
                return Poll::Ready(Ok(()));
            }
            me.ahead.reserve(AHEAD);
            let got = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut me.io), cx, &mut me.ahead))?;
            // No more than the caller asked for (or the end of the stream): not busy.
            me.busy = got > out.remaining();
        }
        let n = out.remaining().min(me.ahead.len());
        out.put_slice(&me.ahead[..n]);
        me.ahead.advance(n);
        if me.ahead.is_empty() && !me.busy {
            me.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The server reads who is calling from the socket under the TLS layer.
impl tonic::transport::server::Connected for ReadAhead<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads `total` bytes in `step`-sized reads, as rustls does, counting the
    /// reads that reached the socket.
    async fn read_all(step: usize, total: usize) -> usize {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let sent: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&data).await.unwrap();
        });
        let mut r = ReadAhead::new(Counting(rx, 0));
        let mut got = Vec::new();
        let mut chunk = vec![0; step];
        while got.len() < total {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, sent, "every byte once, in order");
        r.io.1
    }

    struct Counting<T>(T, usize);

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            let r = Pin::new(&mut me.0).poll_read(cx, buf);
            if r.is_ready() {
                me.1 += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn a_bulk_transfer_is_read_a_large_piece_at_a_time() {
        let total = 8 << 20;
        let reads = read_all(4096, total).await;
        // 2,048 reads of 4 KiB without reading ahead.
        assert!(reads < total / 4096 / 8, "{reads} reads of the socket for {} of 4 KiB", total / 4096);
    }

    #[tokio::test]
    async fn a_trickle_is_read_straight_through_and_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut r = ReadAhead::new(rx);
        let mut chunk = [0u8; 4096];
        for i in 0..50u8 {
            tx.write_all(&[i; 100]).await.unwrap();
            let n = r.read(&mut chunk).await.unwrap();
            assert_eq!(&chunk[..n], &[i; 100][..]);
            assert!(!r.busy && r.ahead.capacity() == 0, "a connection carrying small messages holds no buffer");
        }
        drop(tx);
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0, "the end of the stream comes through");
    }

    #[tokio::test]
    async fn odd_sized_reads_get_every_byte_in_order() {
        for step in [1, 100, 4096, 70_000, AHEAD, AHEAD + 1] {
            read_all(step, 3 * AHEAD + 12_345).await;
        }
    }
}
