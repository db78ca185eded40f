//! A process's memory mappings that name a memfd or a guest_memfd, from /proc/PID/maps.

use nix::errno::Errno;

/// The memfd name in a /proc link such as `/memfd:memory-backend-memfd (deleted)`.
pub(crate) fn memfd_name(link: &str) -> Option<&str> {
    let rest = link.strip_prefix("/memfd:")?;
    Some(rest.strip_suffix(" (deleted)").unwrap_or(rest))
}

/// Whether a /proc link may name a guest_memfd: `anon_inode:[kvm-gmem]` before 6.19, a file of
/// the `guest_memfd` pseudo-filesystem after. The kind is confirmed on the fd taken.
pub(crate) fn maybe_gmem(link: &str) -> bool {
    link.contains("kvm-gmem") || link.contains("guest_memfd")
}

/// One line of /proc/PID/maps that names a memfd or a guest_memfd.
#[derive(Debug)]
pub(crate) struct MapLine {
    pub(crate) range: String,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) offset: u64,
    pub(crate) shared: bool,
    pub(crate) ino: u64,
    pub(crate) link: String,
}

pub(crate) fn memory_mappings(pid: i32) -> Result<Vec<MapLine>, Errno> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(io_errno)?;
    Ok(maps
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ' ');
            let range = f.next()?.to_string();
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let _dev = f.next()?;
            let ino: u64 = f.next()?.parse().ok()?;
            let link = f.next()?.trim_start().to_string();
            (memfd_name(&link).is_some() || maybe_gmem(&link)).then(|| MapLine {
                range,
                start,
                end,
                offset,
                shared: perms.as_bytes().get(3) == Some(&b's'),
                ino,
                link,
            })
        })
        .collect())
}

pub(crate) fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}
