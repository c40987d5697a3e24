//! The jail's request frames: what a stream-mode program writes on fd 1
//! (output records and the end of a fragment), as the supervisor reads them.
//! Whatever the program writes, the supervisor keeps at most the lease's
//! output limit and ends the fragment with a verdict, never a panic.
#![no_main]

use cpushare_sandbox::session::{records_of, Records};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cap = 4096;
    let (records, output) = records_of(data, cap);
    assert!(output.len() <= cap);
    if let Records::End(_) = records {
        // An ended fragment's output is exactly the bytes of its output records.
        assert!(output.len() + 5 <= data.len());
    }
});
