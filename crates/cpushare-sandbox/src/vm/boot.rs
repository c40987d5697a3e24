//! What to boot from a buyer's livecd: the kernel, initrd and command line
//! its isolinux/syslinux or GRUB configuration names, read straight from the
//! ISO 9660 image, so the VM can start the kernel directly (`qemu -kernel`)
//! instead of emulating a BIOS and a CD drive.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use hadris_iso::sync::IsoImage;

/// A kernel to start directly, with its initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
}

impl DirectBoot {
    /// SHA-256 of the kernel and of the initrd: what an attestation names.
    pub fn digests(&self) -> ([u8; 32], Option<[u8; 32]>) {
        use sha2::{Digest, Sha256};
        (Sha256::digest(&self.kernel).into(), self.initrd.as_ref().map(|i| Sha256::digest(i).into()))
    }
}

/// The boot entry a configuration file names (paths inside the ISO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
}

/// Where livecds keep their boot configuration, most common first.
const SYSLINUX: [&str; 5] = ["/isolinux/isolinux.cfg", "/boot/isolinux/isolinux.cfg", "/isolinux.cfg", "/syslinux/syslinux.cfg", "/boot/syslinux/syslinux.cfg"];
const GRUB: [&str; 2] = ["/boot/grub/grub.cfg", "/boot/grub/loopback.cfg"];

/// Reads the direct-boot entry of the ISO at `path`; an error says why it
/// cannot be booted directly (the BIOS path may still boot it).
pub fn direct_boot(path: &Path) -> Result<DirectBoot, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let image = IsoImage::open(BufReader::new(file)).map_err(|e| format!("not an ISO 9660 image: {e:?}"))?;
    let read = |p: &str| -> Result<Option<Vec<u8>>, String> {
        match image.find_path(p).map_err(|e| format!("reading {p}: {e:?}"))? {
            Some(entry) if !entry.is_directory() => image.read_file(&entry).map(Some).map_err(|e| format!("reading {p}: {e:?}")),
            _ => Ok(None),
        }
    };
    let mut entry = None;
    for p in SYSLINUX {
        if let Some(text) = read(p)? {
            entry = syslinux_entry(&String::from_utf8_lossy(&text), p);
            if entry.is_some() {
                break;
            }
        }
    }
    if entry.is_none() {
        for p in GRUB {
            if let Some(text) = read(p)? {
                entry = grub_entry(&String::from_utf8_lossy(&text));
                if entry.is_some() {
                    break;
                }
            }
        }
    }
    let entry = entry.ok_or("no isolinux, syslinux or GRUB boot entry with a Linux kernel")?;
    let kernel = read(&entry.kernel)?.ok_or_else(|| format!("the kernel {} is not in the image", entry.kernel))?;
    let initrd = match &entry.initrd {
        Some(p) => Some(read(p)?.ok_or_else(|| format!("the initrd {p} is not in the image"))?),
        None => None,
    };
    Ok(DirectBoot { kernel, initrd, cmdline: entry.cmdline })
}

/// A path as a configuration gives it, made absolute (relative ones are
/// relative to the configuration's directory).
fn absolute(path: &str, dir: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", dir.trim_end_matches('/'))
    }
}

/// The DEFAULT entry of an isolinux/syslinux configuration (else its first
/// LABEL with a kernel). `initrd=` in APPEND counts as its initrd.
pub fn syslinux_entry(text: &str, config_path: &str) -> Option<Entry> {
    let dir = config_path.rsplit_once('/').map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
    let mut default = None;
    // (label, kernel, initrd, append)
    let mut labels: Vec<(String, Option<String>, Option<String>, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (key, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match key.to_ascii_uppercase().as_str() {
            "DEFAULT" => default = Some(rest.split_whitespace().next().unwrap_or("").to_string()),
            "LABEL" => labels.push((rest.to_string(), None, None, String::new())),
            "KERNEL" | "LINUX" => {
                if let Some(l) = labels.last_mut() {
                    l.1 = Some(rest.to_string());
                }
            }
            "INITRD" => {
                if let Some(l) = labels.last_mut() {
                    l.2 = Some(rest.to_string());
                }
            }
            "APPEND" => {
                if let Some(l) = labels.last_mut() {
                    l.3 = rest.to_string();
                }
            }
            _ => {}
        }
    }
    let chosen = default
        .and_then(|d| labels.iter().find(|l| l.0 == d && l.1.is_some()))
        .or_else(|| labels.iter().find(|l| l.1.as_deref().is_some_and(|k| !k.ends_with(".c32"))))?;
    let (_, kernel, initrd, append) = chosen.clone();
    let kernel = kernel?;
    if kernel.ends_with(".c32") {
        return None;
    }
    let mut initrd = initrd;
    let mut args = Vec::new();
    for word in append.split_whitespace() {
        match word.strip_prefix("initrd=") {
            // Several initrds are joined by commas; the first is the one the kernel needs most.
            Some(i) if initrd.is_none() => initrd = i.split(',').next().map(str::to_string),
            Some(_) => {}
            None => args.push(word),
        }
    }
    Some(Entry { kernel: absolute(&kernel, dir), initrd: initrd.map(|i| absolute(&i, dir)), cmdline: args.join(" ") })
}

/// The default (else the first) `menuentry` of a GRUB configuration.
pub fn grub_entry(text: &str) -> Option<Entry> {
    let default: usize = text.lines().find_map(|l| l.trim().strip_prefix("set default=")).and_then(|v| v.trim_matches('"').parse().ok()).unwrap_or(0);
    let mut entries: Vec<Entry> = Vec::new();
    let mut current: Option<Entry> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("menuentry ") {
            current = Some(Entry { kernel: String::new(), initrd: None, cmdline: String::new() });
        } else if line == "}" {
            if let Some(e) = current.take().filter(|e| !e.kernel.is_empty()) {
                entries.push(e);
            }
        } else if let Some(e) = current.as_mut() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("linux" | "linux16" | "linuxefi") => {
                    e.kernel = words.next().unwrap_or("").to_string();
                    e.cmdline = words.collect::<Vec<_>>().join(" ");
                }
                Some("initrd" | "initrd16" | "initrdefi") => e.initrd = words.next().map(str::to_string),
                _ => {}
            }
        }
    }
    entries.get(default).or(entries.first()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolinux_default_label_with_initrd_in_append() {
        let cfg = "DEFAULT live\nPROMPT 0\nLABEL other\n  KERNEL menu.c32\nLABEL live\n  KERNEL vmlinuz\n  APPEND initrd=initrd.img,extra.img boot=live quiet\n";
        assert_eq!(
            syslinux_entry(cfg, "/isolinux/isolinux.cfg"),
            Some(Entry { kernel: "/isolinux/vmlinuz".into(), initrd: Some("/isolinux/initrd.img".into()), cmdline: "boot=live quiet".into() })
        );
        let ours = "DEFAULT live\nLABEL live\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.gz\n  APPEND console=ttyS0 quiet\n";
        assert_eq!(
            syslinux_entry(ours, "/isolinux/isolinux.cfg"),
            Some(Entry { kernel: "/boot/vmlinuz".into(), initrd: Some("/boot/initrd.gz".into()), cmdline: "console=ttyS0 quiet".into() })
        );
        assert_eq!(syslinux_entry("DEFAULT vesamenu.c32\nLABEL x\n KERNEL chain.c32\n", "/isolinux/isolinux.cfg"), None);
    }

    #[test]
    fn grub_default_menuentry() {
        let cfg = "set default=1\nmenuentry \"A\" {\n linux /a/vmlinuz ro\n}\nmenuentry \"B\" {\n  linux /live/vmlinuz boot=live components\n  initrd /live/initrd.img\n}\n";
        assert_eq!(grub_entry(cfg), Some(Entry { kernel: "/live/vmlinuz".into(), initrd: Some("/live/initrd.img".into()), cmdline: "boot=live components".into() }));
        assert_eq!(grub_entry("menuentry x {\n chainloader +1\n}\n"), None);
    }
}
