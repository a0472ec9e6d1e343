//! Finding OpenSSL in processes and attaching the TLS uprobes to it.
//!
//! A uprobe belongs to a file, not to a process: once attached to `libssl.so.3`, every
//! process that maps that file (now or later, including by `dlopen`) hits it, and the
//! programs filter by the traced set in the kernel. So the agent attaches once per distinct
//! file (device and inode): the system's libssl at start, then any other copy a traced process
//! maps (a vendored libssl, a container's, one in a virtualenv) and executables that carry
//! OpenSSL statically, found in `/proc/PID/maps` when a process first shows up.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{ProgramError, UProbe, uprobe::UProbeScope},
};
use log::{debug, info};

/// (entry program, function) pairs; every function also gets [`RETURN_PROGRAM`].
const ENTRIES: [(&str, &str); 4] = [
    ("tracer_ssl_read", "SSL_read"),
    ("tracer_ssl_read_ex", "SSL_read_ex"),
    ("tracer_ssl_write", "SSL_write"),
    ("tracer_ssl_write_ex", "SSL_write_ex"),
];
const RETURN_PROGRAM: &str = "tracer_ssl_return";

/// Directories where distributions keep the system libssl.
const LIB_DIRS: [&str; 8] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
];

/// The TLS probes: loaded once, attached to each OpenSSL file found.
pub struct OpenSsl {
    /// (device, inode) of files already looked at, attached or not.
    seen: HashSet<(u64, u64)>,
    /// Files the probes are attached to.
    pub attached: Vec<PathBuf>,
}

/// Is this file name an OpenSSL libssl (`libssl.so`, `libssl.so.3`, `libssl.so.1.1`)? NSS's
/// `libssl3.so` is another library.
pub fn is_libssl_name(name: &str) -> bool {
    name == "libssl.so" || name.starts_with("libssl.so.")
}

impl OpenSsl {
    /// Loads the uprobe programs. Attaching comes later, per file.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, ProgramError> {
        for name in ENTRIES.iter().map(|(p, _)| *p).chain([RETURN_PROGRAM]) {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| ProgramError::UnexpectedProgramType)?
                .try_into()?;
            program.load()?;
        }
        Ok(Self {
            seen: HashSet::new(),
            attached: Vec::new(),
        })
    }

    /// Attaches to the system's libssl copies. Returns how many files were attached.
    pub fn attach_system(&mut self, ebpf: &mut Ebpf) -> usize {
        let mut n = 0;
        for dir in LIB_DIRS {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_str().is_some_and(is_libssl_name)
                    && self.attach_file(ebpf, &entry.path())
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Attaches to the OpenSSL files process `pid` maps, and to its executable when OpenSSL is
    /// linked into it. Returns how many new files were attached.
    pub fn attach_process(&mut self, ebpf: &mut Ebpf, pid: u32) -> usize {
        let root = format!("/proc/{pid}/root");
        let mut n = 0;
        if let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) {
            for path in libssl_paths(&maps) {
                // Through the process's root: a container's files are not at that path here.
                if self.attach_file(ebpf, &Path::new(&root).join(path.trim_start_matches('/'))) {
                    n += 1;
                }
            }
        }
        if self.attach_file(ebpf, Path::new(&format!("/proc/{pid}/exe"))) {
            n += 1;
        }
        n
    }

    /// Attaches to one file unless it was looked at before. A file without the OpenSSL
    /// functions (most executables) is remembered and skipped.
    fn attach_file(&mut self, ebpf: &mut Ebpf, path: &Path) -> bool {
        let Ok(meta) = fs::metadata(path) else {
            return false;
        };
        if !self.seen.insert((meta.dev(), meta.ino())) {
            return false;
        }
        // The kernel resolves the path when attaching; a /proc/PID/exe link would die with
        // the process, but the probe stays on the inode it resolved to.
        let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let target = if path.starts_with("/proc/") {
            path
        } else {
            &target
        };
        let mut functions = 0;
        for (entry, function) in ENTRIES {
            if attach_one(ebpf, RETURN_PROGRAM, function, target).is_err() {
                continue;
            }
            match attach_one(ebpf, entry, function, target) {
                Ok(()) => functions += 1,
                Err(e) => debug!("{}: {function}: {e}", target.display()),
            }
        }
        if functions == 0 {
            return false;
        }
        info!(
            "TLS: OpenSSL probes on {} ({functions} functions)",
            path.display()
        );
        self.attached.push(path.to_path_buf());
        true
    }
}

fn attach_one(ebpf: &mut Ebpf, program: &str, function: &str, target: &Path) -> Result<(), String> {
    let program: &mut UProbe = ebpf
        .program_mut(program)
        .ok_or("program missing")?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    program
        .attach(function, target, UProbeScope::AllProcesses)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Paths of libssl files in a `/proc/PID/maps` text, each once.
pub fn libssl_paths(maps: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        if path.starts_with('/') && is_libssl_name(name) && !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_names() {
        assert!(is_libssl_name("libssl.so.3"));
        assert!(is_libssl_name("libssl.so.1.1"));
        assert!(is_libssl_name("libssl.so"));
        assert!(!is_libssl_name("libssl3.so"), "NSS, not OpenSSL");
        assert!(!is_libssl_name("libssl.a"));
        assert!(!is_libssl_name("libcrypto.so.3"));
    }

    #[test]
    fn maps_are_scanned_for_libssl() {
        let maps = "\
55d0c0a00000-55d0c0a2e000 r--p 00000000 08:01 1311 /usr/sbin/nginx
7f1a2b000000-7f1a2b01f000 r--p 00000000 08:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1a2b01f000-7f1a2b07a000 r-xp 0001f000 08:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1a2c000000-7f1a2c021000 rw-p 00000000 00:00 0
7f1a2d000000-7f1a2d010000 r-xp 00000000 08:01 3333 /opt/app/venv/lib/libssl.so.1.1 (deleted)
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            libssl_paths(maps),
            vec![
                "/usr/lib/x86_64-linux-gnu/libssl.so.3".to_string(),
                "/opt/app/venv/lib/libssl.so.1.1".to_string(),
            ]
        );
    }
}
