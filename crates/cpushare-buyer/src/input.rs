//! A fragment's input: bytes in memory, or a file read a piece at a time as
//! it is sent, so that a job's inputs need not fit in the buyer's memory.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Bytes(Vec<u8>),
    /// A file of `len` bytes, its size when the job was made: what it grows
    /// by meanwhile is not sent, and one that shrank is an error when read.
    File { path: PathBuf, len: u64 },
}

impl Input {
    /// The file at `path`, as big as it is now.
    pub fn file(path: impl Into<PathBuf>) -> io::Result<Input> {
        let path = path.into();
        let len = std::fs::metadata(&path)?.len();
        Ok(Input::File { path, len })
    }

    pub fn len(&self) -> usize {
        match self {
            Input::Bytes(b) => b.len(),
            Input::File { len, .. } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends bytes `start..end` of the input to `buf`.
    pub fn read_range(&self, start: usize, end: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Input::Bytes(b) => buf.extend_from_slice(&b[start..end]),
            Input::File { path, .. } => {
                let at = buf.len();
                buf.resize(at + (end - start), 0);
                let read = std::fs::File::open(path).and_then(|file| file.read_exact_at(&mut buf[at..], start as u64));
                read.map_err(|e| {
                    buf.truncate(at);
                    let why = if e.kind() == io::ErrorKind::UnexpectedEof { "it became shorter".to_string() } else { e.to_string() };
                    io::Error::new(e.kind(), format!("cannot read the input {}: {why}", path.display()))
                })?;
            }
        }
        Ok(())
    }

    /// The whole input.
    pub fn load(&self) -> io::Result<Vec<u8>> {
        let mut all = Vec::with_capacity(self.len());
        self.read_range(0, self.len(), &mut all)?;
        Ok(all)
    }
}

impl From<Vec<u8>> for Input {
    fn from(bytes: Vec<u8>) -> Input {
        Input::Bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_input_reads_the_ranges_asked_for_and_a_shrunk_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Input::file(&path).unwrap();
        let bytes = Input::from(data.clone());
        assert_eq!(file.len(), data.len());
        for (start, end) in [(0, 0), (0, 10), (4_000, 10_000), (9_999, 10_000)] {
            let (mut a, mut b) = (b"x".to_vec(), b"x".to_vec());
            file.read_range(start, end, &mut a).unwrap();
            bytes.read_range(start, end, &mut b).unwrap();
            assert_eq!(a, [&b"x"[..], &data[start..end]].concat());
            assert_eq!(a, b);
        }
        assert_eq!(file.load().unwrap(), data);
        std::fs::write(&path, &data[..5_000]).unwrap();
        let e = file.read_range(4_000, 10_000, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("it became shorter"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert!(file.load().is_err());
    }
}
