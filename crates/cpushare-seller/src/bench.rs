//! The fixed benchmark a seller reports its CPUs by: double-precision
//! multiply-adds, in MFLOPS, on one core. The same code everywhere, so scores
//! compare across machines; measured once per CPU model and cached.

use std::path::Path;
use std::time::Instant;

/// Multiply-adds over eight independent chains (so that the CPU's pipelines,
/// not one chain's latency, set the pace); returns MFLOPS.
pub fn measure() -> u32 {
    const ROUNDS: u64 = 20_000_000;
    let mut acc = [1.0f64, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7];
    let (m, a) = (std::hint::black_box(0.999_999_9f64), std::hint::black_box(0.000_000_1f64));
    let start = Instant::now();
    for _ in 0..ROUNDS {
        for x in acc.iter_mut() {
            *x = *x * m + a;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(acc);
    let flops = (ROUNDS * 8 * 2) as f64;
    (flops / secs / 1e6).round().clamp(1.0, u32::MAX as f64) as u32
}

/// This machine's CPU model, as /proc/cpuinfo names it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The score for this CPU model: from the cache in `dir`, or measured (best of three) and cached.
pub fn score(dir: &Path) -> u32 {
    let model = cpu_model();
    let file = dir.join("benchmark.json");
    let mut cache: serde_json::Map<String, serde_json::Value> =
        std::fs::read_to_string(&file).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    if let Some(s) = cache.get(&model).and_then(|v| v.as_u64()) {
        return s as u32;
    }
    let s = (0..3).map(|_| measure()).max().unwrap();
    cache.insert(model, s.into());
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(&file, serde_json::to_string_pretty(&cache).unwrap_or_default());
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_score_is_cached_per_cpu_model() {
        let dir = tempfile::tempdir().unwrap();
        let first = super::score(dir.path());
        assert!(first > 10, "{first} MFLOPS");
        let text = std::fs::read_to_string(dir.path().join("benchmark.json")).unwrap();
        assert!(text.contains(&super::cpu_model()));
        assert_eq!(super::score(dir.path()), first, "the second call reads the cache");
    }
}
