//! Keystore sampler: owns turning the hotkey keystore into a `KeystoreSample` of facts, never keys.
//!
//! It reports where the keystore lives (filesystem type from `statfs(2)`, per-mount flags from
//! `<proc_root>/self/mountinfo`), who may read it (directory and file modes and owners), what is in
//! it (file names, sizes, modification times, a SHA-256 fingerprint per file so that a rotation is
//! visible, and the public ss58 address of Bittensor keyfiles) and whether swap could page it out
//! (`<proc_root>/swaps`).
//!
//! # Guarantees
//! Key material never leaves this module. A keyfile's contents are read into one buffer that is
//! hashed, searched for the public `"ss58Address"` field and overwritten with zeros before it is
//! freed; only the digest and a validated base58 address are kept. Errors name paths and carry
//! the OS error, never file contents, and nothing here logs contents.
//!
//! A missing keystore is not an error: it is reported as `present = false` so that the detector
//! can raise it. Every file format is handled by a small pure parser (`parse_*`) that returns what
//! was wrong as a string; [`KeystoreSampler`] attaches the file path to it as
//! [`SampleError::Parse`].

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use guardian_proto::v1::{KeyFile, KeystoreSample, sample};
use rustix::fs::{Mode, OFlags};

use super::{SampleError, Sampler};

/// At most this many entries (files, symlinks, other non-directories) are listed; the walk stops
/// there, so a keystore path configured at `/` by mistake costs a bounded amount of work.
const MAX_FILES: usize = 1000;

/// Entries more than this many path components below the keystore root are not listed (Bittensor's
/// `wallets/<wallet>/hotkeys/<hotkey>` is 4).
const MAX_DEPTH: usize = 8;

/// Files larger than this are listed without a fingerprint or address: keyfiles are a few hundred
/// bytes, and a large file is not a key worth hashing every round.
const MAX_HASHED_BYTES: u64 = 1024 * 1024;

/// `/proc/swaps` gives sizes in KiB.
const KIB: u64 = 1024;

/// Characters of Bitcoin-style base58, the alphabet of ss58 addresses (no `0`, `O`, `I`, `l`).
const BASE58_ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Lengths an ss58 address of a 32-byte public key can have, depending on the network prefix.
const SS58_LENGTHS: std::ops::RangeInclusive<usize> = 46..=48;

/// Samples the facts of one keystore directory.
///
/// Stateless between rounds: rotation is detected downstream by comparing fingerprints.
#[derive(Debug)]
pub struct KeystoreSampler {
    /// The keystore root as configured (a directory such as `~/.bittensor/wallets`, or one file).
    keystore_path: PathBuf,
    /// Where `self/mountinfo` and `swaps` live (normally `/proc`).
    proc_root: PathBuf,
}

impl KeystoreSampler {
    /// A sampler reporting on `keystore_path`, reading mount and swap tables from `proc_root`
    /// (normally `/proc`). Reads nothing until the first [`Sampler::sample`].
    pub fn new(keystore_path: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            keystore_path: keystore_path.into(),
            proc_root: proc_root.into(),
        }
    }

    /// Takes one sample of the keystore.
    fn sample_keystore(&self) -> Result<KeystoreSample, SampleError> {
        let configured = &self.keystore_path;
        let path = configured.to_string_lossy().into_owned();
        // Follows symlinks: a keystore path that is a link to the real directory is normal.
        let metadata = match std::fs::metadata(configured) {
            Ok(metadata) => metadata,
            Err(error) if is_absent(&error) => {
                return Ok(KeystoreSample {
                    path,
                    present: false,
                    ..KeystoreSample::default()
                });
            }
            Err(source) => return Err(read_error(configured, source)),
        };
        let root = std::fs::canonicalize(configured).map_err(|e| read_error(configured, e))?;

        let filesystem_type = filesystem_type(&root)?;
        let mountinfo_path = self.proc_root.join("self").join("mountinfo");
        let mountinfo =
            std::fs::read(&mountinfo_path).map_err(|e| read_error(&mountinfo_path, e))?;
        let flags = parse_mountinfo(&mountinfo)
            .and_then(|mounts| {
                containing_mount(&mounts, &root)
                    .ok_or_else(|| format!("no mount point contains {}", root.to_string_lossy()))
            })
            .map_err(|detail| SampleError::Parse {
                path: mountinfo_path.clone(),
                detail,
            })?;

        let files = if metadata.is_dir() {
            list_files(&root)?
        } else {
            // A keystore configured as a single file: list that file under its own name.
            let name = root
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            key_file(&root, name, &metadata)?.into_iter().collect()
        };
        let swap = self.swap()?;

        Ok(KeystoreSample {
            path,
            present: true,
            on_tmpfs: filesystem_type == "tmpfs",
            filesystem_type,
            mount_nodev: flags.nodev,
            mount_nosuid: flags.nosuid,
            mount_noexec: flags.noexec,
            mount_read_only: flags.read_only,
            dir_mode: metadata.mode() & 0o7777,
            dir_uid: metadata.uid(),
            dir_gid: metadata.gid(),
            file_count: u32::try_from(files.len()).unwrap_or(u32::MAX),
            total_bytes: files.iter().map(|file| file.size_bytes).sum(),
            files,
            swap_active: swap.active,
            swap_total_bytes: swap.total_bytes,
        })
    }

    /// Reads `<proc_root>/swaps`; a kernel built without swap support has no such file, which
    /// means no swap.
    fn swap(&self) -> Result<Swap, SampleError> {
        let path = self.proc_root.join("swaps");
        match std::fs::read(&path) {
            Ok(bytes) => parse_swaps(&String::from_utf8_lossy(&bytes))
                .map_err(|detail| SampleError::Parse { path, detail }),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(Swap::default()),
            Err(source) => Err(SampleError::Read { path, source }),
        }
    }
}

impl Sampler for KeystoreSampler {
    fn name(&self) -> &'static str {
        "keystore"
    }

    fn sample(&mut self) -> Result<sample::Kind, SampleError> {
        self.sample_keystore().map(sample::Kind::Keystore)
    }
}

/// Per-mount flags of the mount holding the keystore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct MountFlags {
    /// `nodev`: device files on it are not honoured.
    nodev: bool,
    /// `nosuid`: set-user-id bits on it are ignored.
    nosuid: bool,
    /// `noexec`: nothing on it can be executed.
    noexec: bool,
    /// `ro` on the mount or on the filesystem (superblock) itself.
    read_only: bool,
}

/// One line of `/proc/self/mountinfo`, as far as the keystore sample needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The mount point, octal escapes decoded; raw bytes because paths need not be UTF-8.
    mount_point: Vec<u8>,
    /// Flags from the per-mount options (field 6) and the superblock options.
    flags: MountFlags,
}

/// Swap state from `/proc/swaps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Swap {
    /// At least one swap device or file is in use.
    active: bool,
    /// Sum of the sizes of all swap areas.
    total_bytes: u64,
}

/// The keyfile facts kept from a file's contents; the contents themselves are gone by then.
#[derive(Debug, Default)]
struct ContentFacts {
    /// Lowercase hex SHA-256 of the contents.
    sha256_fingerprint: String,
    /// Public ss58 address when the file is a Bittensor keyfile that carries one.
    ss58_address: String,
}

/// A buffer of file contents that is overwritten with zeros when dropped.
///
/// Best effort: it keeps key bytes from lingering in freed heap memory. The buffer is allocated
/// with room to spare so that reading does not reallocate and leave an unscrubbed copy behind.
struct Scrubbed(Vec<u8>);

impl Drop for Scrubbed {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keeps the compiler from eliding the writes to memory that is about to be freed.
        std::hint::black_box(&self.0);
    }
}

/// Whether an I/O error means "the path is not there" (rather than "cannot look").
fn is_absent(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

/// A [`SampleError::Read`] naming `path`.
fn read_error(path: &Path, source: std::io::Error) -> SampleError {
    SampleError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// The name of the filesystem holding `path`, from its `statfs(2)` magic number.
fn filesystem_type(path: &Path) -> Result<String, SampleError> {
    let stats = rustix::fs::statfs(path).map_err(|errno| SampleError::Statfs {
        path: path.to_path_buf(),
        source: errno.into(),
    })?;
    // `f_type` is a signed word whose width depends on the target; every magic is 32 bits, and
    // masking undoes the sign extension of large magics (btrfs) on 32-bit targets.
    Ok(filesystem_name(stats.f_type as u64 & 0xffff_ffff))
}

/// Maps a `statfs(2)` `f_type` magic number to a filesystem name, `unknown:0x...` otherwise.
fn filesystem_name(magic: u64) -> String {
    let name = match magic {
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x794c_7630 => "overlay",
        0x6969 => "nfs",
        0x2fc1_2fc1 => "zfs",
        0x0102_1997 => "9p",
        0x6573_5546 => "fuse",
        0xf15f => "ecryptfs",
        _ => return format!("unknown:{magic:#x}"),
    };
    name.to_owned()
}

/// Decodes the octal escapes (`\040` for a space, `\011`, `\012`, `\134`) that the kernel writes
/// into mount points in mountinfo. A backslash not followed by three octal digits is kept.
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(field.len());
    let mut rest = field;
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'\\'
            && let [
                a @ b'0'..=b'3',
                b @ b'0'..=b'7',
                c @ b'0'..=b'7',
                after @ ..,
            ] = tail
        {
            decoded.push(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'));
            rest = after;
            continue;
        }
        decoded.push(byte);
        rest = tail;
    }
    decoded
}

/// Flags from a comma-separated option list; only the four the sample reports are recognised.
fn apply_options(flags: &mut MountFlags, options: &[u8]) {
    for option in options.split(|&b| b == b',') {
        match option {
            b"nodev" => flags.nodev = true,
            b"nosuid" => flags.nosuid = true,
            b"noexec" => flags.noexec = true,
            b"ro" => flags.read_only = true,
            _ => {}
        }
    }
}

/// Parses `/proc/<pid>/mountinfo` into every mount, in file order.
///
/// A line is `id parent major:minor root mount_point mount_options [optional...] - fstype source
/// super_options`. nodev/nosuid/noexec are per-mount options; `ro` counts from either list, since a
/// read-only superblock makes every mount of it read-only.
fn parse_mountinfo(text: &[u8]) -> Result<Vec<Mount>, String> {
    let mut mounts = Vec::new();
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let fields: Vec<&[u8]> = line
            .split(|&b| b == b' ')
            .filter(|field| !field.is_empty())
            .collect();
        if fields.is_empty() {
            continue;
        }
        let (Some(mount_point), Some(mount_options)) = (fields.get(4), fields.get(5)) else {
            return Err(format!(
                "line {}: {} fields, expected at least 10",
                index + 1,
                fields.len()
            ));
        };
        let Some(separator) = fields.iter().skip(6).position(|field| *field == b"-") else {
            return Err(format!("line {}: no `-` separator", index + 1));
        };
        // fstype, source, then the superblock options.
        let Some(super_options) = fields.get(6 + separator + 3) else {
            return Err(format!(
                "line {}: no superblock options after `-`",
                index + 1
            ));
        };
        let mut flags = MountFlags::default();
        apply_options(&mut flags, mount_options);
        if super_options
            .split(|&b| b == b',')
            .any(|option| option == b"ro")
        {
            flags.read_only = true;
        }
        mounts.push(Mount {
            mount_point: unescape_octal(mount_point),
            flags,
        });
    }
    Ok(mounts)
}

/// Flags of the mount holding `path`: the mount point that is the longest component-wise prefix
/// of `path` (so `/mnt/key` does not hold `/mnt/keystore`). Of several mounts on the same point
/// the last one listed is on top and wins. `None` when no mount point is a prefix.
fn containing_mount(mounts: &[Mount], path: &Path) -> Option<MountFlags> {
    let mut best: Option<(usize, MountFlags)> = None;
    for mount in mounts {
        let mount_point = Path::new(OsStr::from_bytes(&mount.mount_point));
        if !path.starts_with(mount_point) {
            continue;
        }
        let depth = mount_point.components().count();
        if best.is_none_or(|(best_depth, _)| depth >= best_depth) {
            best = Some((depth, mount.flags));
        }
    }
    best.map(|(_, flags)| flags)
}

/// Parses `/proc/swaps`: a header line, then one line per active swap area with its size in KiB
/// in the third column.
fn parse_swaps(text: &str) -> Result<Swap, String> {
    let mut swap = Swap::default();
    for (index, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        // The header is the only line starting with "Filename"; names are absolute paths.
        if fields.first().is_none_or(|first| *first == "Filename") {
            continue;
        }
        let Some(size) = fields.get(2) else {
            return Err(format!(
                "line {}: {} fields, expected at least 3",
                index + 1,
                fields.len()
            ));
        };
        let kib: u64 = size
            .parse()
            .map_err(|_| format!("line {}: size `{size}` is not a number", index + 1))?;
        swap.active = true;
        swap.total_bytes = swap.total_bytes.saturating_add(kib.saturating_mul(KIB));
    }
    Ok(swap)
}

/// Lists the keystore directory `root`: every non-directory entry down to [`MAX_DEPTH`], at
/// most [`MAX_FILES`] of them, sorted by name.
fn list_files(root: &Path) -> Result<Vec<KeyFile>, SampleError> {
    let mut files = Vec::new();
    let complete = walk(root, root, 1, &mut files)?;
    if !complete {
        tracing::warn!(
            path = %root.display(),
            limit = MAX_FILES,
            "KeystoreListingTruncated"
        );
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Adds the entries of `dir` (whose entries are `depth` components below `root`) to `files`,
/// descending into subdirectories without following symlinks. Returns `false` once
/// [`MAX_FILES`] is reached.
///
/// Entries are visited in name order so that the truncation point is stable across rounds.
/// An entry that disappears while being looked at (a rotation in progress) is skipped.
fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    files: &mut Vec<KeyFile>,
) -> Result<bool, SampleError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if is_absent(&error) => return Ok(true),
        Err(source) => return Err(read_error(dir, source)),
    };
    let mut entries = entries
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| read_error(dir, source))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        // `DirEntry::metadata` is lstat: a symlink is reported as itself, never followed.
        let metadata = match entry.metadata() {
            Ok(metadata) => metadata,
            Err(error) if is_absent(&error) => continue,
            Err(source) => return Err(read_error(&path, source)),
        };
        if metadata.is_dir() {
            if depth < MAX_DEPTH && !walk(root, &path, depth + 1, files)? {
                return Ok(false);
            }
            continue;
        }
        if files.len() >= MAX_FILES {
            return Ok(false);
        }
        let name = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        if let Some(file) = key_file(&path, name, &metadata)? {
            files.push(file);
        }
    }
    Ok(true)
}

/// The facts of one keystore entry whose lstat is `metadata`; `None` if it vanished meanwhile.
///
/// A regular file of at most [`MAX_HASHED_BYTES`] is read for its fingerprint and address.
/// Symlinks, FIFOs, sockets and devices are listed with their own mode and owner, size 0 and
/// no fingerprint: they are never opened (opening a FIFO would block, following a link would
/// leave the keystore).
fn key_file(
    path: &Path,
    name: String,
    metadata: &Metadata,
) -> Result<Option<KeyFile>, SampleError> {
    let mut file = KeyFile {
        name,
        mode: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        modified_unix_ms: modified_unix_ms(metadata),
        ..KeyFile::default()
    };
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        return Ok(Some(file));
    }
    file.size_bytes = metadata.len();
    if file.size_bytes > MAX_HASHED_BYTES {
        return Ok(Some(file));
    }
    match content_facts(path)? {
        Some(facts) => {
            file.sha256_fingerprint = facts.sha256_fingerprint;
            file.ss58_address = facts.ss58_address;
            Ok(Some(file))
        }
        None => Ok(None),
    }
}

/// Reads a keyfile and keeps only its fingerprint and public address; `None` if it vanished.
///
/// Opened with `O_NOFOLLOW | O_NONBLOCK` and checked with `fstat`, so a file swapped for a
/// symlink or a FIFO after it was listed is neither followed nor blocked on; such a file, or
/// one that grew past [`MAX_HASHED_BYTES`], yields empty facts.
fn content_facts(path: &Path) -> Result<Option<ContentFacts>, SampleError> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(errno) => return Err(read_error(path, errno.into())),
    };
    let file = File::from(fd);
    let metadata = file.metadata().map_err(|e| read_error(path, e))?;
    if !metadata.is_file() || metadata.len() > MAX_HASHED_BYTES {
        return Ok(Some(ContentFacts::default()));
    }
    // Room for one byte more than expected, so reading to the end needs no reallocation.
    let capacity = usize::try_from(metadata.len())
        .unwrap_or(0)
        .saturating_add(1);
    let mut contents = Scrubbed(Vec::with_capacity(capacity));
    file.take(MAX_HASHED_BYTES + 1)
        .read_to_end(&mut contents.0)
        .map_err(|e| read_error(path, e))?;
    if contents.0.len() as u64 > MAX_HASHED_BYTES {
        return Ok(Some(ContentFacts::default()));
    }
    let facts = ContentFacts {
        sha256_fingerprint: sha256_hex(&contents.0),
        ss58_address: extract_ss58(&contents.0).unwrap_or_default(),
    };
    drop(contents);
    Ok(Some(facts))
}

/// Lowercase hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Modification time in Unix milliseconds.
fn modified_unix_ms(metadata: &Metadata) -> i64 {
    metadata
        .mtime()
        .saturating_mul(1000)
        .saturating_add(metadata.mtime_nsec() / 1_000_000)
}

/// The public ss58 address of a Bittensor keyfile: the first `"ss58Address": "<value>"` whose
/// value is 46 to 48 base58 characters.
///
/// A deliberate byte scanner rather than a JSON parser (the agent has none, and the rest of the
/// file is secret and of no interest): whatever else the file holds is never copied out.
fn extract_ss58(contents: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"ss58Address\"";
    let mut rest = contents;
    while let Some(at) = rest.windows(KEY.len()).position(|window| window == KEY) {
        rest = rest.get(at + KEY.len()..)?;
        if let Some(value) = quoted_value(rest)
            && is_ss58(value)
        {
            return String::from_utf8(value.to_vec()).ok();
        }
    }
    None
}

/// The string in `: "<string>"` at the start of `text` (whitespace allowed around the colon).
fn quoted_value(text: &[u8]) -> Option<&[u8]> {
    let text = text.trim_ascii_start().strip_prefix(b":")?;
    let text = text.trim_ascii_start().strip_prefix(b"\"")?;
    let end = text.iter().position(|&b| b == b'"')?;
    text.get(..end)
}

/// Whether `value` looks like an ss58 address: 46 to 48 base58 characters.
fn is_ss58(value: &[u8]) -> bool {
    SS58_LENGTHS.contains(&value.len()) && value.iter().all(|b| BASE58_ALPHABET.contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use prost::Message;
    use tempfile::TempDir;

    /// Alice's well-known development address.
    const ALICE_SS58: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
    /// Secret fields of the fixture keyfile; none may ever appear in a sample.
    const SECRET_PHRASE: &str =
        "absorb tribe vivid orbit canal pepper wisdom lunar hybrid mango tenant giggle";
    const SECRET_SEED: &str = "0x7f3a9c2e5b8d1f4a6c0e9b2d5f8a1c4e7b0d3f6a9c2e5b8d1f4a7c0e3b6d9f2a";
    const PRIVATE_KEY: &str = "0x58e1d4c7a0b3f6e9d2c5b8a1f4e7d0c3b6a9f2e5d8c1b4a7f0e3d6c9b2a5f8e1\
                               4d7a0c3f6b9e2d5a8c1f4b7e0d3a6c9f2b5e8d1a4c7f0b3e6d9a2c5f8b1e4d7a";

    /// A realistic unencrypted Bittensor hotkey file.
    fn hotkey_json() -> String {
        format!(
            "{{\"accountId\": \"0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d\", \
             \"publicKey\": \"0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d\", \
             \"privateKey\": \"{PRIVATE_KEY}\", \
             \"secretPhrase\": \"{SECRET_PHRASE}\", \
             \"secretSeed\": \"{SECRET_SEED}\", \
             \"ss58Address\": \"{ALICE_SS58}\"}}"
        )
    }

    /// Lowercase hex SHA-256 computed independently of the code under test.
    fn expected_sha256(bytes: &[u8]) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        digest.as_ref().iter().fold(String::new(), |mut hex, byte| {
            hex.push_str(&format!("{byte:02x}"));
            hex
        })
    }

    /// A keystore directory and a fake proc root, each in its own temporary directory.
    struct Fixture {
        /// The keystore root.
        keystore: TempDir,
        /// The proc root holding `self/mountinfo` and `swaps`.
        proc: TempDir,
    }

    impl Fixture {
        /// An empty keystore on a mount flagged `nodev,nosuid,noexec`, and no swap.
        fn new() -> Self {
            let fixture = Self {
                keystore: tempfile::tempdir().expect("keystore dir"),
                proc: tempfile::tempdir().expect("proc dir"),
            };
            let canonical = std::fs::canonicalize(fixture.keystore.path()).expect("canonical");
            let mountinfo = format!(
                "22 1 0:21 / /proc rw,relatime - proc proc rw\n\
                 1 0 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
                 40 1 0:50 / {} rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,size=1024k\n",
                canonical.display()
            );
            fixture.write_proc("self/mountinfo", &mountinfo);
            fixture.write_proc("swaps", "Filename\tType\tSize\tUsed\tPriority\n");
            fixture
        }

        /// Writes a fake proc file.
        fn write_proc(&self, relative: &str, contents: &str) {
            let path = self.proc.path().join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create proc dir");
            }
            std::fs::write(path, contents).expect("write proc file");
        }

        /// Writes a keystore file with the given mode, creating directories.
        fn write_key(&self, relative: &str, contents: &[u8], mode: u32) {
            let path = self.keystore.path().join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create keystore dir");
            }
            std::fs::write(&path, contents).expect("write key");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .expect("chmod key");
        }

        /// Samples the keystore.
        fn sample(&self) -> KeystoreSample {
            KeystoreSampler::new(self.keystore.path(), self.proc.path())
                .sample_keystore()
                .expect("keystore sample")
        }
    }

    /// The entry named `name`.
    fn file<'a>(sample: &'a KeystoreSample, name: &str) -> &'a KeyFile {
        sample
            .files
            .iter()
            .find(|file| file.name == name)
            .unwrap_or_else(|| panic!("no file {name} in {:?}", sample.files))
    }

    #[test]
    fn mountinfo_longest_prefix_mount_gives_the_flags() {
        let text = b"1 0 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
            30 1 8:2 / /home rw,nodev,relatime shared:2 - ext4 /dev/sda2 rw\n\
            31 30 0:40 / /home/validator/.bittensor rw,nosuid,nodev,noexec master:7 - tmpfs tmpfs rw\n\
            32 1 0:41 / /home/validator/.bitten rw,relatime - tmpfs tmpfs ro\n";
        let mounts = parse_mountinfo(text).expect("valid mountinfo");
        assert_eq!(mounts.len(), 4);
        let keystore = Path::new("/home/validator/.bittensor/wallets/default/hotkeys/default");
        assert_eq!(
            containing_mount(&mounts, keystore),
            Some(MountFlags {
                nodev: true,
                nosuid: true,
                noexec: true,
                read_only: false,
            }),
            "optional fields are skipped and `.bitten` is not a prefix of `.bittensor`"
        );
        assert_eq!(
            containing_mount(&mounts, Path::new("/home/other")),
            Some(MountFlags {
                nodev: true,
                ..MountFlags::default()
            })
        );
        assert_eq!(
            containing_mount(&mounts, Path::new("/var/lib")),
            Some(MountFlags::default())
        );
        assert_eq!(
            containing_mount(&mounts, Path::new("/home/validator/.bitten/x")),
            Some(MountFlags {
                read_only: true,
                ..MountFlags::default()
            }),
            "a read-only superblock makes the mount read-only"
        );
    }

    #[test]
    fn mountinfo_octal_escaped_mount_points_are_decoded() {
        let text = b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
            50 1 0:60 / /mnt/key\\040store\\011tab\\134 ro,nosuid - tmpfs tmpfs rw\n";
        let mounts = parse_mountinfo(text).expect("valid mountinfo");
        assert_eq!(mounts[1].mount_point, b"/mnt/key store\ttab\\");
        let flags =
            containing_mount(&mounts, Path::new("/mnt/key store\ttab\\/hotkeys")).expect("a mount");
        assert!(flags.read_only && flags.nosuid && !flags.nodev && !flags.noexec);
        assert_eq!(
            unescape_octal(b"a\\04b\\"),
            b"a\\04b\\",
            "incomplete escapes are kept"
        );
    }

    #[test]
    fn mountinfo_later_mount_on_the_same_point_is_on_top() {
        let text = b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
            60 1 0:70 / /keys rw - ext4 /dev/sdb1 rw\n\
            61 60 0:71 / /keys rw,nodev - tmpfs tmpfs rw\n";
        let mounts = parse_mountinfo(text).expect("valid mountinfo");
        let flags = containing_mount(&mounts, Path::new("/keys/a")).expect("a mount");
        assert!(flags.nodev);
    }

    #[test]
    fn malformed_mountinfo_is_an_error_not_a_panic() {
        assert!(parse_mountinfo(b"1 0 8:1 / /\n").is_err());
        assert!(parse_mountinfo(b"1 0 8:1 / / rw shared:1 ext4 /dev/sda1 rw\n").is_err());
        assert!(parse_mountinfo(b"1 0 8:1 / / rw - ext4\n").is_err());
        assert_eq!(parse_mountinfo(b"\n\n"), Ok(Vec::new()));
        assert_eq!(containing_mount(&[], Path::new("/keys")), None);
    }

    #[test]
    fn swaps_without_devices_means_no_swap() {
        let swap =
            parse_swaps("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n").expect("valid swaps");
        assert_eq!(swap, Swap::default());
        assert_eq!(parse_swaps(""), Ok(Swap::default()));
    }

    #[test]
    fn swaps_with_devices_sum_their_sizes() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sda2                               partition\t8388604\t\t0\t\t-2\n\
                    /swap\\040file                           file\t\t1024\t\t0\t\t-3\n";
        let swap = parse_swaps(text).expect("valid swaps");
        assert!(swap.active);
        assert_eq!(swap.total_bytes, (8_388_604 + 1024) * 1024);
        assert!(parse_swaps("Filename Type Size\n/dev/sda2 partition\n").is_err());
        assert!(parse_swaps("Filename Type Size\n/dev/sda2 partition big 0 -2\n").is_err());
    }

    #[test]
    fn statfs_magic_numbers_map_to_names() {
        assert_eq!(filesystem_name(0x0102_1994), "tmpfs");
        assert_eq!(filesystem_name(0x8584_58f6), "ramfs");
        assert_eq!(filesystem_name(0xef53), "ext4");
        assert_eq!(filesystem_name(0x5846_5342), "xfs");
        assert_eq!(filesystem_name(0x9123_683e), "btrfs");
        assert_eq!(filesystem_name(0x794c_7630), "overlay");
        assert_eq!(filesystem_name(0x6969), "nfs");
        assert_eq!(filesystem_name(0x2fc1_2fc1), "zfs");
        assert_eq!(filesystem_name(0x1234), "unknown:0x1234");
    }

    #[test]
    fn ss58_address_is_extracted_from_a_bittensor_keyfile() {
        assert_eq!(
            extract_ss58(hotkey_json().as_bytes()).as_deref(),
            Some(ALICE_SS58)
        );
        let coldkeypub = format!(
            "{{\"accountId\":\"0xd435\",\"publicKey\":\"0xd435\",\"ss58Address\" :\n\t\"{ALICE_SS58}\"}}"
        );
        assert_eq!(
            extract_ss58(coldkeypub.as_bytes()).as_deref(),
            Some(ALICE_SS58)
        );
    }

    #[test]
    fn values_that_are_not_ss58_addresses_are_not_extracted() {
        // Too short, a non-base58 `0`, not a string, no key at all, unterminated, binary noise.
        for text in [
            "{\"ss58Address\": \"5GrwvaEF5zXb26Fz9rcQpDWS57\"}",
            "{\"ss58Address\": \"0GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY\"}",
            "{\"ss58Address\": 5}",
            "{\"publicKey\": \"0xd435\"}",
            "{\"ss58Address\": \"5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
            "$NACL\u{1}\u{2}\"ss58Address\"",
        ] {
            assert_eq!(extract_ss58(text.as_bytes()), None, "{text}");
        }
        let second = format!("{{\"ss58Address\": \"\", \"ss58Address\": \"{ALICE_SS58}\"}}");
        assert_eq!(extract_ss58(second.as_bytes()).as_deref(), Some(ALICE_SS58));
    }

    #[test]
    fn keystore_on_disk_is_listed_with_modes_and_fingerprints() {
        let fixture = Fixture::new();
        let hotkey = hotkey_json();
        fixture.write_key("default/hotkeys/default", hotkey.as_bytes(), 0o600);
        let coldkeypub = b"{\"ss58Address\": \"x\"}";
        fixture.write_key("default/coldkeypub.txt", coldkeypub, 0o644);
        std::fs::set_permissions(
            fixture.keystore.path(),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod keystore");

        let sample = fixture.sample();
        assert!(sample.present);
        assert_eq!(sample.path, fixture.keystore.path().to_string_lossy());
        assert!(!sample.filesystem_type.is_empty());
        assert_eq!(sample.on_tmpfs, sample.filesystem_type == "tmpfs");
        assert!(sample.mount_nodev && sample.mount_nosuid && sample.mount_noexec);
        assert!(!sample.mount_read_only);
        assert_eq!(sample.dir_mode, 0o700);
        let owner = std::fs::metadata(fixture.keystore.path()).expect("stat keystore");
        assert_eq!((sample.dir_uid, sample.dir_gid), (owner.uid(), owner.gid()));
        assert!(!sample.swap_active);
        assert_eq!(sample.swap_total_bytes, 0);

        let names: Vec<&str> = sample.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["default/coldkeypub.txt", "default/hotkeys/default"]);
        assert_eq!(sample.file_count, 2);
        assert_eq!(sample.total_bytes, (hotkey.len() + coldkeypub.len()) as u64);
        let key = file(&sample, "default/hotkeys/default");
        assert_eq!(key.mode, 0o600);
        assert_eq!(key.size_bytes, hotkey.len() as u64);
        assert_eq!(key.sha256_fingerprint, expected_sha256(hotkey.as_bytes()));
        assert_eq!(key.ss58_address, ALICE_SS58);
        assert!(
            key.modified_unix_ms > 1_600_000_000_000,
            "{}",
            key.modified_unix_ms
        );
        let public = file(&sample, "default/coldkeypub.txt");
        assert_eq!(
            public.mode, 0o644,
            "a world-readable file is reported as such"
        );
        assert_eq!(
            public.ss58_address, "",
            "an invalid address is not reported"
        );
    }

    #[test]
    fn changing_a_key_changes_its_fingerprint() {
        let fixture = Fixture::new();
        fixture.write_key("hotkeys/default", b"old key", 0o600);
        let before = fixture.sample();
        fixture.write_key("hotkeys/default", b"new key", 0o600);
        let after = fixture.sample();
        let (old, new) = (
            &file(&before, "hotkeys/default").sha256_fingerprint,
            &file(&after, "hotkeys/default").sha256_fingerprint,
        );
        assert_eq!(old, &expected_sha256(b"old key"));
        assert_eq!(new, &expected_sha256(b"new key"));
        assert_ne!(old, new);
    }

    #[test]
    fn an_extra_file_increases_file_count_and_total_bytes() {
        let fixture = Fixture::new();
        fixture.write_key("hotkeys/default", b"0123456789", 0o600);
        let before = fixture.sample();
        fixture.write_key("hotkeys/extra", b"abc", 0o600);
        let after = fixture.sample();
        assert_eq!((before.file_count, before.total_bytes), (1, 10));
        assert_eq!((after.file_count, after.total_bytes), (2, 13));
    }

    #[test]
    fn loosened_key_mode_is_reported() {
        let fixture = Fixture::new();
        fixture.write_key("hotkeys/default", b"key", 0o600);
        assert_eq!(file(&fixture.sample(), "hotkeys/default").mode, 0o600);
        std::fs::set_permissions(
            fixture.keystore.path().join("hotkeys/default"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod 0644");
        assert_eq!(file(&fixture.sample(), "hotkeys/default").mode, 0o644);
    }

    #[test]
    fn missing_keystore_is_reported_absent_not_an_error() {
        let fixture = Fixture::new();
        fixture.write_key("not-a-dir", b"", 0o600);
        for missing in [
            fixture.keystore.path().join("no-such-wallets"),
            fixture.keystore.path().join("not-a-dir/below"),
        ] {
            let mut sampler = KeystoreSampler::new(&missing, fixture.proc.path());
            let Ok(sample::Kind::Keystore(sample)) = sampler.sample() else {
                panic!("a missing keystore must still give a keystore sample");
            };
            assert!(!sample.present);
            assert_eq!(sample.path, missing.to_string_lossy());
            assert!(sample.files.is_empty());
            assert_eq!(sample.filesystem_type, "");
        }
    }

    #[test]
    fn no_key_material_reaches_the_sample() {
        let fixture = Fixture::new();
        let hotkey = hotkey_json();
        fixture.write_key("default/hotkeys/default", hotkey.as_bytes(), 0o600);
        fixture.write_key("default/coldkey", hotkey.as_bytes(), 0o600);
        let sample = fixture.sample();
        assert_eq!(file(&sample, "default/coldkey").ss58_address, ALICE_SS58);

        let debug = format!("{sample:?}");
        let encoded = sample.encode_to_vec();
        let encoded_text = String::from_utf8_lossy(&encoded);
        let mut secrets: Vec<&str> = SECRET_PHRASE.split(' ').collect();
        secrets.extend([
            SECRET_PHRASE,
            SECRET_SEED,
            &SECRET_SEED[2..],
            PRIVATE_KEY,
            &PRIVATE_KEY[2..],
            "secretPhrase",
            "secretSeed",
            "privateKey",
        ]);
        for secret in secrets {
            assert!(!debug.contains(secret), "Debug carries `{secret}`");
            assert!(
                !encoded_text.contains(secret),
                "encoding carries `{secret}`"
            );
        }
        // Nor the raw seed bytes.
        let seed: Vec<u8> = (2..SECRET_SEED.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&SECRET_SEED[i..i + 2], 16).expect("hex"))
            .collect();
        assert!(!encoded.windows(seed.len()).any(|window| window == seed));
    }

    #[test]
    fn symlinks_and_fifos_are_listed_but_never_opened() {
        let fixture = Fixture::new();
        let outside = tempfile::NamedTempFile::new().expect("outside file");
        std::fs::write(outside.path(), b"secret elsewhere").expect("write outside");
        std::os::unix::fs::symlink(outside.path(), fixture.keystore.path().join("link"))
            .expect("symlink");
        let fifo = fixture.keystore.path().join("fifo");
        let status = Command::new("mkfifo").arg(&fifo).status();
        let made_fifo = status.is_ok_and(|status| status.success());

        let sample = fixture.sample();
        let link = file(&sample, "link");
        assert_eq!(link.size_bytes, 0);
        assert_eq!(link.sha256_fingerprint, "");
        if made_fifo {
            let fifo = file(&sample, "fifo");
            assert_eq!((fifo.size_bytes, fifo.sha256_fingerprint.as_str()), (0, ""));
        }
        assert_eq!(sample.total_bytes, 0);
    }

    #[test]
    fn walk_stops_at_the_depth_and_file_bounds() {
        let fixture = Fixture::new();
        fixture.write_key("1/2/3/4/5/6/7/deep", b"x", 0o600);
        fixture.write_key("1/2/3/4/5/6/7/8/too-deep", b"x", 0o600);
        let sample = fixture.sample();
        let names: Vec<&str> = sample.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["1/2/3/4/5/6/7/deep"]);

        let many = Fixture::new();
        for index in 0..MAX_FILES + 5 {
            std::fs::write(many.keystore.path().join(format!("{index:05}")), b"")
                .expect("write file");
        }
        let sample = many.sample();
        assert_eq!(sample.file_count as usize, MAX_FILES);
        assert_eq!(sample.files.len(), MAX_FILES);
        assert_eq!(
            sample.files[MAX_FILES - 1].name,
            format!("{:05}", MAX_FILES - 1)
        );
    }

    #[test]
    fn large_files_are_listed_without_fingerprint() {
        let fixture = Fixture::new();
        let big = vec![b'a'; (MAX_HASHED_BYTES + 1) as usize];
        fixture.write_key("backup.tar", &big, 0o600);
        let sample = fixture.sample();
        let backup = file(&sample, "backup.tar");
        assert_eq!(backup.size_bytes, MAX_HASHED_BYTES + 1);
        assert_eq!(backup.sha256_fingerprint, "");
        assert_eq!(sample.total_bytes, MAX_HASHED_BYTES + 1);
    }

    #[test]
    fn keystore_configured_as_one_file_lists_that_file() {
        let fixture = Fixture::new();
        fixture.write_key("hotkey", hotkey_json().as_bytes(), 0o600);
        let sample =
            KeystoreSampler::new(fixture.keystore.path().join("hotkey"), fixture.proc.path())
                .sample_keystore()
                .expect("sample");
        assert!(sample.present);
        assert_eq!(sample.file_count, 1);
        assert_eq!(file(&sample, "hotkey").ss58_address, ALICE_SS58);
        assert_eq!(sample.dir_mode, 0o600);
    }

    #[test]
    fn swap_devices_in_the_proc_root_are_reported() {
        let fixture = Fixture::new();
        fixture.write_proc(
            "swaps",
            "Filename\tType\tSize\tUsed\tPriority\n/dev/dm-1 partition 2097148 0 -2\n",
        );
        let sample = fixture.sample();
        assert!(sample.swap_active);
        assert_eq!(sample.swap_total_bytes, 2_097_148 * 1024);
    }

    #[test]
    fn unreadable_mountinfo_is_a_read_error_naming_the_file() {
        let fixture = Fixture::new();
        std::fs::remove_file(fixture.proc.path().join("self/mountinfo")).expect("remove");
        let error = KeystoreSampler::new(fixture.keystore.path(), fixture.proc.path())
            .sample()
            .expect_err("no mountinfo");
        assert!(
            matches!(&error, SampleError::Read { path, .. } if path.ends_with("self/mountinfo")),
            "{error:?}"
        );
    }

    #[test]
    fn sampler_is_named_keystore_and_yields_a_keystore_kind() {
        let fixture = Fixture::new();
        let mut sampler = KeystoreSampler::new(fixture.keystore.path(), fixture.proc.path());
        assert_eq!(sampler.name(), "keystore");
        assert!(matches!(sampler.sample(), Ok(sample::Kind::Keystore(_))));
    }

    /// Whether this process runs with effective uid 0 (second field of `Uid:` in status).
    fn running_as_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_ascii_whitespace().nth(1))
                == Some("0")
        })
    }

    /// Unmounts its directory when dropped, including when an assertion fails.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let unmounted = Command::new("umount").arg(&self.0).status();
            if !unmounted.is_ok_and(|status| status.success()) {
                eprintln!("could not unmount {}", self.0.display());
            }
        }
    }

    #[test]
    fn real_tmpfs_keystore_is_detected() {
        if !running_as_root() {
            println!("real_tmpfs_keystore_is_detected: not root, cannot mount tmpfs; skipped");
            return;
        }
        // Declared before the guard so it is removed after the unmount.
        let dir = tempfile::tempdir().expect("mount point");
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=1m,mode=0700,nosuid,nodev,noexec",
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(mounted.success(), "mount -t tmpfs failed as root");
        let _guard = Mounted(dir.path().to_path_buf());
        let key = dir.path().join("hotkey");
        std::fs::write(&key, hotkey_json()).expect("write key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

        let sample = KeystoreSampler::new(dir.path(), "/proc")
            .sample_keystore()
            .expect("sample of the tmpfs keystore");
        assert_eq!(sample.filesystem_type, "tmpfs");
        assert!(sample.on_tmpfs);
        assert!(sample.mount_nosuid && sample.mount_nodev && sample.mount_noexec);
        assert!(!sample.mount_read_only);
        assert_eq!(sample.dir_mode, 0o700);
        assert_eq!(file(&sample, "hotkey").ss58_address, ALICE_SS58);
    }
}
