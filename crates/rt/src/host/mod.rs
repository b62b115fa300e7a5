//! Is this host tuned for real-time VMs? `check` reads what the KVM4NFV
//! environment guide and the RT-KVM talks recommend and says what to fix;
//! `tune` applies the run-time fixes, all or none, with an undo file.
//!
//! Everything goes through [`HostFs`], rooted at a directory, so the same
//! code runs on `/` and on fixture trees.

pub mod check;
pub mod fixture;
pub mod tune;

use std::io;
use std::path::{Path, PathBuf};

/// The host's /proc, /sys, /dev and /etc, under a root.
pub trait HostFs {
    /// The root, for messages.
    fn root(&self) -> &Path;
    fn read(&self, path: &str) -> io::Result<String>;
    fn write(&self, path: &str, value: &str) -> io::Result<()>;
    fn exists(&self, path: &str) -> bool;
    /// Names in a directory, sorted.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
}

/// The real file system under `root` (`/` for this host).
pub struct RealFs {
    root: PathBuf,
}

impl RealFs {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<RealFs> {
        let root = root.into();
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("root {} is not a directory", root.display()),
            ));
        }
        Ok(RealFs { root })
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
}

impl HostFs for RealFs {
    fn root(&self) -> &Path {
        &self.root
    }

    fn read(&self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(self.path(path))
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        use std::io::Write;
        // sysfs and procfs take one write of the whole value; only
        // configuration files under /etc may be created
        use std::os::unix::fs::OpenOptionsExt;
        // (never through a link planted at the last component)
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .create(path.starts_with("/etc/"))
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.path(path))?;
        f.write_all(value.as_bytes())
    }

    fn exists(&self, path: &str) -> bool {
        self.path(path).exists()
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(dir))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Opens a root: the host's own file system, or a fixture tree (a root
/// holding `.fixture/`, whose writes follow the kernel's rules).
pub fn open_root(root: &Path) -> io::Result<Box<dyn HostFs>> {
    if root.join(".fixture").is_dir() {
        Ok(Box::new(fixture::FixtureFs::new(root)?))
    } else {
        Ok(Box::new(RealFs::new(root)?))
    }
}

/// Reads a file and trims it; None when it is absent or unreadable.
pub fn read_opt(fs: &dyn HostFs, path: &str) -> Option<String> {
    fs.read(path).ok().map(|s| s.trim().to_string())
}

/// Parses a kernel CPU mask ("ff", "00000000,0000000f") into CPU numbers.
pub fn parse_cpu_mask(mask: &str) -> Option<Vec<usize>> {
    let hex: String = mask.trim().chars().filter(|c| *c != ',').collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut cpus = Vec::new();
    for (i, c) in hex.chars().rev().enumerate() {
        let nibble = c.to_digit(16)? as usize;
        for bit in 0..4 {
            if nibble & (1 << bit) != 0 {
                cpus.push(i * 4 + bit);
            }
        }
    }
    Some(cpus)
}

/// Formats CPU numbers as a kernel CPU mask (32-bit groups, comma separated).
pub fn format_cpu_mask(cpus: &[usize]) -> String {
    let max = cpus.iter().copied().max().unwrap_or(0);
    let groups = max / 32 + 1;
    let mut words = vec![0u32; groups];
    for &c in cpus {
        words[c / 32] |= 1 << (c % 32);
    }
    words
        .iter()
        .rev()
        .map(|w| format!("{w:08x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Formats CPU numbers as a CPU list ("0-3,8").
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        while i + 1 < v.len() && v[i + 1] == v[i] + 1 {
            i += 1;
        }
        out.push(if v[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", v[i])
        });
        i += 1;
    }
    out.join(",")
}

/// The value a sysfs "choice" file holds: `always madvise [never]` -> never.
pub fn selected_choice(text: &str) -> Option<&str> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    Some(&text[start + 1..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_lists_round_trip() {
        assert_eq!(parse_cpu_mask("f").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cpu_mask("00000001,00000002").unwrap(), vec![1, 32]);
        assert_eq!(format_cpu_mask(&[1, 32]), "00000001,00000002");
        assert_eq!(format_cpu_mask(&[0, 1]), "00000003");
        assert!(parse_cpu_mask("xyz").is_none());
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(selected_choice("always madvise [never]"), Some("never"));
    }
}
