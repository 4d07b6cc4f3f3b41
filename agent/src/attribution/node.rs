//! The node name every batch carries.

/// The node name: the configured one (the config layer already applied
/// `NODE_NAME`), else the kernel's host name, else `unknown`.
pub fn node_name(configured: &str) -> String {
    if !configured.trim().is_empty() {
        return configured.trim().to_owned();
    }
    host_name().unwrap_or_else(|| {
        tracing::warn!("cannot read the host name and NODE_NAME is not set; labelling samples with node `unknown`");
        "unknown".to_owned()
    })
}

/// The UTS host name (`uname -n`).
fn host_name() -> Option<String> {
    // SAFETY: `utsname` is plain old data; zeroed is a valid value and
    // `uname` only writes into the struct we pass.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts.nodename.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    let name = String::from_utf8_lossy(&bytes).trim().to_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_name_wins() {
        assert_eq!(node_name(" worker-3 "), "worker-3");
    }

    #[test]
    fn falls_back_to_the_host_name() {
        let name = node_name("");
        assert!(!name.is_empty());
        let proc_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        if !proc_name.trim().is_empty() {
            assert_eq!(name, proc_name.trim());
        }
    }
}
