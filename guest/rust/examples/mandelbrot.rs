//! mandelbrot, in Rust: the same program as `guest/examples/mandelbrot.c`, byte
//! for byte the same output.
//!
//! Input (text): "X0 Y0 STEP WIDTH HEIGHT MAXITER", e.g. "-2.0 -1.2 0.005 64 64 256".
//! Pixel (i, j) is the point X0 + i*STEP + (Y0 + j*STEP)i.
//! Output: a binary PGM image of the tile: black inside the set; outside, the
//! slower a point escapes, the brighter (1 + 254k/(k+24) for k iterations).
#![no_std]
#![no_main]

use core::fmt::Write;
use cpushare_guest::{log, read_input, write_all, Fd, OUTPUT};

const MAX_PIXELS: usize = 4096 * 4096;
static mut INPUT: [u8; 255] = [0; 255];
static mut IMAGE: [u8; MAX_PIXELS] = [0; MAX_PIXELS];

/// The C example's number parser, so both read "0.005" as the same double.
fn number(p: &mut &[u8]) -> Option<f64> {
    while let [b' ' | b'\n' | b'\t', rest @ ..] = *p {
        *p = rest;
    }
    let neg = p.first() == Some(&b'-');
    if neg {
        *p = &p[1..];
    }
    let (mut v, mut scale, mut digits) = (0.0f64, 1.0f64, 0);
    while let [d @ b'0'..=b'9', rest @ ..] = *p {
        v = v * 10.0 + (d - b'0') as f64;
        digits += 1;
        *p = rest;
    }
    if let [b'.', rest @ ..] = *p {
        *p = rest;
        while let [d @ b'0'..=b'9', rest @ ..] = *p {
            scale /= 10.0;
            v += (d - b'0') as f64 * scale;
            digits += 1;
            *p = rest;
        }
    }
    (digits > 0).then_some(if neg { -v } else { v })
}

fn main() -> i32 {
    let Ok(input) = read_input(unsafe { &mut *core::ptr::addr_of_mut!(INPUT) }) else {
        log("mandelbrot: expected \"X0 Y0 STEP WIDTH HEIGHT MAXITER\" on input");
        return 2;
    };
    let mut p = input;
    let mut v = [0.0f64; 6];
    for slot in &mut v {
        let Some(x) = number(&mut p) else {
            log("mandelbrot: expected six numbers: X0 Y0 STEP WIDTH HEIGHT MAXITER");
            return 2;
        };
        *slot = x;
    }
    let (w, h, max) = (v[3] as i64, v[4] as i64, v[5] as i64);
    if w < 1 || h < 1 || w * h > MAX_PIXELS as i64 || max < 1 {
        log("mandelbrot: tile too large or empty");
        return 2;
    }
    let image: &mut [u8; MAX_PIXELS] = unsafe { &mut *core::ptr::addr_of_mut!(IMAGE) };
    let image = &mut image[..(w * h) as usize];
    for j in 0..h {
        let ci = v[1] + j as f64 * v[2];
        for i in 0..w {
            let cr = v[0] + i as f64 * v[2];
            let (mut zr, mut zi, mut k) = (0.0f64, 0.0f64, 0i64);
            while k < max && zr * zr + zi * zi < 4.0 {
                let t = zr * zr - zi * zi + cr;
                zi = 2.0 * zr * zi + ci;
                zr = t;
                k += 1;
            }
            image[(j * w + i) as usize] = if k == max { 0 } else { (1 + (254 * k) / (k + 24)) as u8 };
        }
    }
    if write!(Fd(OUTPUT), "P5\n{w} {h}\n255\n").is_err() || write_all(OUTPUT, image).is_err() {
        return 1;
    }
    0
}

cpushare_guest::entry!(main);
