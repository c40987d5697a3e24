//! An ordinary Rust program with std, linked statically (crt-static): counts
//! the words of a file into another, with a HashMap (seeded by getrandom).
use std::collections::HashMap;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).expect("input");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in text.split_whitespace() {
        *counts.entry(w).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort();
    let out: String = v.iter().map(|(w, c)| format!("{w} {c}\n")).collect();
    std::fs::write(&args[2], &out).expect("output");
    println!("{} distinct words, cwd {}", v.len(), std::env::current_dir().unwrap().display());
}
