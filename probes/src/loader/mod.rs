//! Loading the embedded BPF objects and attaching them per mode.
//!
//! [`Probes`] owns one aya [`Ebpf`] per loaded mode. Every attachment is an
//! fd-based link or perf event owned by it, so dropping [`Probes`] — or the
//! process ending in any way, SIGKILL included — detaches everything;
//! nothing is pinned.
//!
//! What the overhead budget changes is changed live, without detaching:
//! the cpu-clock frequency with `PERF_EVENT_IOC_PERIOD` on the perf events
//! this module opens itself ([`Probes::set_frequency`]), and the lock and
//! slow-syscall thresholds in each object's `ap_settings` array map, which
//! the programs read on every event ([`Probes::set_thresholds`]).

mod config;
mod sys;
mod unwind;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use aperture_core::model::Mode;
use aya::maps::{Array, HashMap, Map, MapError, ProgramArray};
use aya::programs::{BtfTracePoint, PerfEvent, ProgramError, RawTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfError, EbpfLoader, include_bytes_aligned};

pub use config::{Filter, Modes, ProbeConfig, UnwindMode, UnwindSettings};
pub use unwind::{UnwindError, UnwindStats};

use unwind::Unwinder;

use crate::abi::Settings;
use crate::reader::{
    BatchSink, PERF_ATTR_SIZE_VER0, PERF_TYPE_SOFTWARE, PerfBuffer, PerfEventAttr, PerfReader, ReaderConfig,
    ReaderError, perf_event_open_cpu,
};

/// `PERF_COUNT_SW_CPU_CLOCK`.
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
/// `perf_event_attr` flag bit `disabled`.
const ATTR_FLAG_DISABLED: u64 = 1;
/// `PERF_EVENT_IOC_ENABLE`, `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `PERF_EVENT_IOC_PERIOD`, `_IOW('$', 4, __u64)`: the sample period.
const PERF_EVENT_IOC_PERIOD: libc::c_ulong = 0x4008_2404;
/// `PERF_EVENT_IOC_SET_BPF`, `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// `cpu.bpf.o`, built by `probes/build-bpf.sh`.
static CPU_OBJECT: &[u8] = include_bytes_aligned!("../../bpf/obj/cpu.bpf.o");
/// `lock.bpf.o`.
static LOCK_OBJECT: &[u8] = include_bytes_aligned!("../../bpf/obj/lock.bpf.o");
/// `syscall.bpf.o`.
static SYSCALL_OBJECT: &[u8] = include_bytes_aligned!("../../bpf/obj/syscall.bpf.o");

/// The embedded object of a mode.
pub fn object_bytes(mode: Mode) -> &'static [u8] {
    match mode {
        Mode::Cpu => CPU_OBJECT,
        Mode::Lock => LOCK_OBJECT,
        Mode::Syscall => SYSCALL_OBJECT,
    }
}

/// Why loading the programs failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No mode was requested.
    #[error("no probe mode requested; set APERTURE_MODE to cpu, lock, syscall or all")]
    NoMode,
    /// The kernel's BTF could not be read.
    #[error(
        "reading the kernel BTF (/sys/kernel/btf/vmlinux) failed: {0}; a kernel built with CONFIG_DEBUG_INFO_BTF=y is required"
    )]
    Btf(#[source] aya::BtfError),
    /// aya rejected the object or creating its maps failed.
    #[error("loading the {mode} BPF object failed: {source}")]
    Object {
        /// The mode of the object.
        mode: Mode,
        /// aya's error.
        #[source]
        source: EbpfError,
    },
    /// Writing the initial thresholds into the `ap_settings` map failed.
    #[error("writing the settings map of the {mode} BPF object failed: {source}")]
    Settings {
        /// The mode of the object.
        mode: Mode,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// Creating the unwinder's shared maps failed.
    #[error("setting up the unwind tables failed: {0}; `unwind: frame_pointers` walks stacks without them")]
    Unwind(#[source] UnwindError),
    /// Filling the pid/cgroup filter maps failed.
    #[error("filling filter map {map} of the {mode} object failed: {source}; at most 4096 pids and 4096 cgroups fit")]
    Filter {
        /// The mode of the object.
        mode: Mode,
        /// Map name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
}

/// Why attaching a program failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A program expected in the embedded object is missing or of another type.
    #[error("program {0} is missing from the embedded object or has an unexpected type (build mismatch)")]
    Missing(&'static str),
    /// The verifier or the kernel refused every flavour of a program.
    #[error("no attach flavour of {what} worked; last error from {program}: {source}")]
    Attach {
        /// What was being attached, e.g. `sys_enter`.
        what: &'static str,
        /// The last program tried.
        program: &'static str,
        /// aya's error (contains the verifier log for load failures).
        #[source]
        source: ProgramError,
    },
    /// The kernel's BTF (`/sys/kernel/btf/vmlinux`) could not be read.
    #[error("reading the kernel's BTF failed: {0}")]
    Btf(#[source] aya::BtfError),
    /// Listing the online CPUs failed.
    #[error("reading the online CPUs from {path} failed: {source}")]
    Cpus {
        /// The file read.
        path: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why a live settings change failed (the previous settings stay in
/// effect where the change did not apply).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Writing the `ap_settings` map of an object failed.
    #[error("updating the thresholds of the {mode} programs failed: {source}")]
    Map {
        /// The mode of the object.
        mode: Mode,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// `PERF_EVENT_IOC_PERIOD` on a cpu-clock event failed.
    #[error("changing the cpu-clock sampling frequency to {hz} Hz failed: {source}")]
    Frequency {
        /// The frequency asked for.
        hz: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How a program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// BTF-enabled raw tracepoint (`tp_btf`), the cheapest.
    BtfRawTracepoint,
    /// Raw tracepoint.
    RawTracepoint,
    /// Classic tracepoint (needs tracefs).
    Tracepoint,
    /// perf_event program on a cpu-clock event per CPU.
    PerfEvent,
}

/// One attached program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The mode it serves.
    pub mode: Mode,
    /// The program (kernel name, all start with `ap_`).
    pub program: &'static str,
    /// The hook, e.g. `sys_enter` or `cpu-clock`.
    pub point: &'static str,
    /// How it is attached.
    pub flavour: Flavour,
}

pub(crate) struct LoadedObject {
    pub(crate) mode: Mode,
    pub(crate) ebpf: Ebpf,
}

/// The loaded (and, after [`Probes::attach`], attached) BPF programs.
pub struct Probes {
    pub(crate) objects: Vec<LoadedObject>,
    config: ProbeConfig,
    attachments: Vec<Attachment>,
    /// One cpu-clock perf event per online CPU running `ap_cpu_sample`.
    cpu_events: Vec<OwnedFd>,
    /// Unwind tables; `None` with `unwind: frame_pointers`.
    unwinder: Option<Unwinder>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("modes", &self.objects.iter().map(|o| o.mode).collect::<Vec<_>>())
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

impl Probes {
    /// Loads the objects of `config.modes` and creates their maps, with the
    /// thresholds and filter of `config`. Nothing is attached yet.
    pub fn load(config: &ProbeConfig) -> Result<Probes, LoadError> {
        if config.modes.is_empty() {
            return Err(LoadError::NoMode);
        }
        // The kernel's BTF must be there (the programs are relocated with
        // it); said here with the path rather than as a relocation failure.
        if let Err(error) = std::fs::metadata(crate::preflight::BTF_PATH) {
            return Err(LoadError::Btf(aya::BtfError::FileError { path: crate::preflight::BTF_PATH.into(), error }));
        }
        let filter_enabled = u32::from(config.filter.is_some());
        let ignore_tgid = if config.ignore_self { std::process::id() } else { 0 };
        let settings = settings_of(config);
        let unwind_enabled = u32::from(config.unwind.mode == UnwindMode::Tables);
        let has_task_pt_regs = u32::from(kernel_at_least(5, 15));
        let mut objects = Vec::new();
        // One loader for every mode: creating one parses the kernel's BTF
        // (vmlinux: ~5 MiB of it, ~20 MiB of memory while parsing and
        // ~0.1 CPU-s), which it keeps until it is dropped at the end here.
        let mut loader = EbpfLoader::new();
        loader
            .override_global("ap_filter_enabled", &filter_enabled, true)
            .override_global("ap_ignore_tgid", &ignore_tgid, true)
            .override_global("ap_unwind_enabled", &unwind_enabled, true)
            .override_global("ap_has_task_pt_regs", &has_task_pt_regs, true);
        for mode in config.modes.iter() {
            let mut ebpf = loader.load(object_bytes(mode)).map_err(|source| LoadError::Object { mode, source })?;
            write_settings(&mut ebpf, settings).map_err(|source| LoadError::Settings { mode, source })?;
            if let Some(filter) = &config.filter {
                fill_filter(&mut ebpf, mode, filter)?;
            }
            objects.push(LoadedObject { mode, ebpf });
        }
        let unwinder = match config.unwind.mode {
            UnwindMode::Tables => Some(Unwinder::new(&config.unwind, &mut objects).map_err(LoadError::Unwind)?),
            UnwindMode::FramePointers => None,
        };
        drop(loader);
        Ok(Probes { objects, config: config.clone(), attachments: Vec::new(), cpu_events: Vec::new(), unwinder })
    }

    /// Changes the lock and slow-syscall thresholds of the loaded programs
    /// while they run: the next event already sees them. Nothing is
    /// detached, so no event is missed.
    pub fn set_thresholds(&mut self, lock: Duration, slow_syscall: Duration) -> Result<(), SettingsError> {
        let mut wanted = self.config.clone();
        wanted.lock_threshold = lock;
        wanted.slow_syscall_threshold = slow_syscall;
        let settings = settings_of(&wanted);
        for obj in &mut self.objects {
            write_settings(&mut obj.ebpf, settings).map_err(|source| SettingsError::Map { mode: obj.mode, source })?;
        }
        self.config = wanted;
        Ok(())
    }

    /// Changes the cpu-clock sampling frequency of the attached cpu-mode
    /// program while it runs (`PERF_EVENT_IOC_PERIOD` on each CPU's event).
    /// Before [`Probes::attach`] it only changes what attach will use.
    pub fn set_frequency(&mut self, frequency_hz: u64) -> Result<(), SettingsError> {
        let hz = frequency_hz.max(1);
        for fd in &self.cpu_events {
            // The events are opened with a period (cpu-clock counts ns), not
            // a frequency: for hrtimer-based software events the kernel
            // turns a frequency into a fixed period at open and forgets it,
            // so a frequency given here would be taken as a period in ns.
            let value: u64 = clock_period_ns(hz);
            // SAFETY: PERF_EVENT_IOC_PERIOD reads one u64 through the pointer,
            // which points to a live local; the fd is a perf event we own.
            let ret = unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_PERIOD, &raw const value) };
            if ret < 0 {
                return Err(SettingsError::Frequency { hz, source: io::Error::last_os_error() });
            }
        }
        self.config.frequency_hz = hz;
        Ok(())
    }

    /// Number of cpu-clock perf events the cpu-mode program is attached to
    /// (one per online CPU once attached).
    pub fn cpu_event_count(&self) -> usize {
        self.cpu_events.len()
    }

    /// The settings in effect (frequency and thresholds as last set).
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// Loads the programs into the kernel and attaches them. On error, what
    /// was attached stays attached until `self` is dropped.
    pub fn attach(&mut self) -> Result<(), AttachError> {
        // BTF tracepoints (lock and syscall modes) name their point through
        // the kernel's BTF: parsed for this only, and not kept (it would
        // hold ~15 MiB for the agent's life).
        let needs_btf = self.objects.iter().any(|o| matches!(o.mode, Mode::Lock | Mode::Syscall));
        let btf = if needs_btf { Some(Btf::from_sys_fs().map_err(AttachError::Btf)?) } else { None };
        for i in 0..self.objects.len() {
            let mode = self.objects[i].mode;
            let ebpf = &mut self.objects[i].ebpf;
            let new = match mode {
                Mode::Cpu => {
                    if self.unwinder.is_some() {
                        install_step::<PerfEvent>(ebpf, "ap_cpu_unwind", "ap_cpu_unwind_progs", |p| p.load())?;
                    }
                    let (attachments, events) = attach_cpu(ebpf, self.config.frequency_hz)?;
                    self.cpu_events.extend(events);
                    attachments
                }
                Mode::Lock => {
                    if self.unwinder.is_some()
                        && let Err(e) =
                            install_step::<TracePoint>(ebpf, "ap_lockunw", "ap_lock_unwind_progs", |p| p.load())
                    {
                        tracing::warn!(error = %e, "futex wait stacks fall back to frame pointers");
                    }
                    attach_lock(ebpf, btf.as_ref().ok_or(AttachError::Missing("kernel BTF"))?)?
                }
                Mode::Syscall => attach_syscall(
                    ebpf,
                    btf.as_ref().ok_or(AttachError::Missing("kernel BTF"))?,
                    self.unwinder.is_some(),
                )?,
            };
            self.attachments.extend(new);
        }
        if self.unwinder.is_some()
            && let Some(obj) = self.objects.first_mut()
        {
            // One object is enough: they share the processes map.
            let mode = obj.mode;
            let attached = program::<RawTracePoint>(&mut obj.ebpf, "ap_unwind_exec").and_then(|p| {
                p.load().and_then(|()| p.attach("sched_process_exec")).map_err(|source| AttachError::Attach {
                    what: "sched_process_exec",
                    program: "ap_unwind_exec",
                    source,
                })
            });
            match attached {
                Ok(_) => {
                    if let Some(u) = self.unwinder.as_mut() {
                        u.exec_hooked = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(mode = %mode, error = %e, "exec is noticed only when a sample misses the old mappings")
                }
            }
        }
        Ok(())
    }

    /// Reads the executable mappings of `pid` and loads the unwind tables
    /// it needs, so its stacks are walked with them from the next sample
    /// on. Returns how many mappings have a table (0 with
    /// `unwind: frame_pointers`). The work runs on the unwind thread; this
    /// waits for it.
    pub fn unwind_process(&mut self, pid: u32) -> Result<usize, UnwindError> {
        match &mut self.unwinder {
            Some(u) => u.add_process(pid),
            None => Ok(0),
        }
    }

    /// Asks the unwind thread to load tables for the processes the walker
    /// met without them (new processes, exec, dlopen) now. It does so on
    /// its own every 50 ms, and forgets exited processes every second, so
    /// calling this is optional; it never blocks.
    pub fn unwind_refresh(&mut self) -> Result<(), UnwindError> {
        match &mut self.unwinder {
            Some(u) => u.poke(),
            None => Ok(()),
        }
    }

    /// The kernel thread id of the unwind thread, which reads mappings and
    /// builds and loads the tables (`None` with `unwind: frame_pointers`),
    /// so its CPU time can be accounted to the agent.
    pub fn unwind_thread_id(&self) -> Option<u32> {
        self.unwinder.as_ref().map(|u| u.thread_id()).filter(|&t| t != 0)
    }

    /// The unwinder's state and the walker's counters.
    pub fn unwind_stats(&self) -> UnwindStats {
        self.unwinder.as_ref().map(|u| u.stats(&self.objects)).unwrap_or_default()
    }

    /// What is attached, and how.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The modes loaded.
    pub fn modes(&self) -> Modes {
        self.objects.iter().map(|o| o.mode).collect()
    }

    /// Opens one perf ring per online CPU for every loaded object, registers
    /// them in the objects' `ap_events` maps and starts the reader thread
    /// delivering to `sink`. Call it before [`Probes::attach`] so no early
    /// event is dropped. The reader keeps running if `self` is dropped (it
    /// then sees no new events).
    pub fn start_reader<S: BatchSink>(&mut self, config: &ReaderConfig, sink: S) -> Result<PerfReader, ReaderError> {
        let cpus = aya::util::online_cpus().map_err(|(_, e)| ReaderError::OpenRing { cpu: 0, source: e })?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let watermark = config.watermark_for(config.pages_per_cpu * page);
        let mut buffers = Vec::new();
        for obj in &mut self.objects {
            let Some(Map::PerfEventArray(map)) = obj.ebpf.map("ap_events") else {
                return Err(ReaderError::Register {
                    cpu: 0,
                    map: format!("{}/ap_events", obj.mode),
                    source: io::Error::new(io::ErrorKind::NotFound, "map missing from the object"),
                });
            };
            for &cpu in &cpus {
                let buf = PerfBuffer::open(cpu, config.pages_per_cpu, watermark)
                    .map_err(|source| ReaderError::OpenRing { cpu, source })?;
                sys::map_update_fd(map.fd().as_fd(), buf.cpu(), buf.as_fd())
                    .map_err(|source| ReaderError::Register { cpu, map: format!("{}/ap_events", obj.mode), source })?;
                buffers.push(buf);
            }
        }
        PerfReader::spawn(buffers, config, sink)
    }

    pub(crate) fn object_mut(&mut self, mode: Mode) -> Option<&mut Ebpf> {
        self.objects.iter_mut().find(|o| o.mode == mode).map(|o| &mut o.ebpf)
    }

    pub(crate) fn objects_mut(&mut self) -> impl Iterator<Item = (Mode, &mut Ebpf)> {
        self.objects.iter_mut().map(|o| (o.mode, &mut o.ebpf))
    }
}

/// Loads an unwind step program and stores it at index 0 of its prog array.
fn install_step<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    array: &'static str,
    load: impl FnOnce(&mut T) -> Result<(), ProgramError>,
) -> Result<(), AttachError>
where
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    T: StepProgram,
{
    let fail = |source| AttachError::Attach { what: "unwind step", program: name, source };
    let prog: &mut T = program(ebpf, name)?;
    load(prog).map_err(fail)?;
    let fd = prog.step_fd().map_err(fail)?;
    let map = ebpf.map_mut(array).ok_or(AttachError::Missing(array))?;
    let mut progs = ProgramArray::try_from(map).map_err(|e| fail(ProgramError::MapError(e)))?;
    progs.set(0, &fd, 0).map_err(|e| fail(ProgramError::MapError(e)))?;
    Ok(())
}

/// The program types that host an unwind step program.
trait StepProgram {
    fn step_fd(&self) -> Result<aya::programs::ProgramFd, ProgramError>;
}

macro_rules! step_program {
    ($($t:ty),*) => {$(
        impl StepProgram for $t {
            fn step_fd(&self) -> Result<aya::programs::ProgramFd, ProgramError> {
                self.fd()?.try_clone().map_err(|io_error| {
                    ProgramError::SyscallError(aya::sys::SyscallError { call: "dup", io_error })
                })
            }
        }
    )*};
}
step_program!(PerfEvent, BtfTracePoint, RawTracePoint, TracePoint);

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| crate::preflight::parse_kernel_version(r.trim()))
        .is_some_and(|v| v >= (major, minor))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The cpu-clock sample period (ns of CPU time) for `hz` samples a second.
fn clock_period_ns(hz: u64) -> u64 {
    1_000_000_000 / hz.clamp(1, 1_000_000_000)
}

fn settings_of(config: &ProbeConfig) -> Settings {
    Settings {
        lock_threshold_ns: duration_ns(config.lock_threshold),
        slow_threshold_ns: duration_ns(config.slow_syscall_threshold),
    }
}

/// Writes entry 0 of the object's `ap_settings` array.
fn write_settings(ebpf: &mut Ebpf, settings: Settings) -> Result<(), MapError> {
    let map = ebpf.map_mut("ap_settings").ok_or(MapError::InvalidName { name: "ap_settings".into() })?;
    let mut array: Array<_, Settings> = Array::try_from(map)?;
    array.set(0, settings, 0)
}

fn fill_filter(ebpf: &mut Ebpf, mode: Mode, filter: &Filter) -> Result<(), LoadError> {
    let err = |map: &'static str| move |source| LoadError::Filter { mode, map, source };
    let map = ebpf.map_mut("ap_filter_pids").ok_or(MapError::InvalidName { name: "ap_filter_pids".into() });
    let mut pids: HashMap<_, u32, u8> =
        HashMap::try_from(map.map_err(err("ap_filter_pids"))?).map_err(err("ap_filter_pids"))?;
    for pid in &filter.pids {
        pids.insert(pid, 1, 0).map_err(err("ap_filter_pids"))?;
    }
    let map = ebpf.map_mut("ap_filter_cgroups").ok_or(MapError::InvalidName { name: "ap_filter_cgroups".into() });
    let mut cgroups: HashMap<_, u64, u8> =
        HashMap::try_from(map.map_err(err("ap_filter_cgroups"))?).map_err(err("ap_filter_cgroups"))?;
    for cg in &filter.cgroups {
        cgroups.insert(cg, 1, 0).map_err(err("ap_filter_cgroups"))?;
    }
    Ok(())
}

/// Loads the cpu-mode program and attaches it to one cpu-clock perf event
/// per online CPU, opened here (not through aya) so that their period can
/// be changed later with `PERF_EVENT_IOC_PERIOD`. Closing an event detaches
/// the program from it.
fn attach_cpu(ebpf: &mut Ebpf, frequency_hz: u64) -> Result<(Vec<Attachment>, Vec<OwnedFd>), AttachError> {
    const NAME: &str = "ap_cpu_sample";
    let cpus = aya::util::online_cpus().map_err(|(path, source)| AttachError::Cpus { path, source })?;
    let prog: &mut PerfEvent = program(ebpf, NAME)?;
    let fail = |source| AttachError::Attach { what: "cpu-clock", program: NAME, source };
    prog.load().map_err(fail)?;
    let prog_fd = prog.fd().map_err(fail)?.as_fd().as_raw_fd();
    let io_fail = |call: &'static str| {
        move |io_error| AttachError::Attach {
            what: "cpu-clock",
            program: NAME,
            source: ProgramError::SyscallError(aya::sys::SyscallError { call, io_error }),
        }
    };
    let attr = PerfEventAttr {
        ty: PERF_TYPE_SOFTWARE,
        size: PERF_ATTR_SIZE_VER0,
        config: PERF_COUNT_SW_CPU_CLOCK,
        sample_period: clock_period_ns(frequency_hz),
        flags: ATTR_FLAG_DISABLED,
        ..PerfEventAttr::default()
    };
    let mut events = Vec::with_capacity(cpus.len());
    for cpu in cpus {
        let fd = perf_event_open_cpu(&attr, cpu).map_err(io_fail("perf_event_open"))?;
        let raw = fd.as_raw_fd();
        // SAFETY: both ioctls take an integer argument (the program fd, then
        // nothing) on a perf event fd we own.
        if unsafe { libc::ioctl(raw, PERF_EVENT_IOC_SET_BPF, prog_fd as libc::c_ulong) } < 0 {
            return Err(io_fail("PERF_EVENT_IOC_SET_BPF")(io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::ioctl(raw, PERF_EVENT_IOC_ENABLE, 0 as libc::c_ulong) } < 0 {
            return Err(io_fail("PERF_EVENT_IOC_ENABLE")(io::Error::last_os_error()));
        }
        events.push(fd);
    }
    Ok((vec![Attachment { mode: Mode::Cpu, program: NAME, point: "cpu-clock", flavour: Flavour::PerfEvent }], events))
}

/// The names of one hook's three flavours (any may be absent).
struct Flavours {
    what: &'static str,
    btf: Option<&'static str>,
    raw: Option<&'static str>,
    tracepoint: Option<(&'static str, &'static str, &'static str)>,
}

/// Attaches the first flavour of a hook the kernel accepts.
fn attach_first(ebpf: &mut Ebpf, btf: &Btf, mode: Mode, f: &Flavours) -> Result<Attachment, AttachError> {
    let mut last = None;
    if let Some(name) = f.btf {
        let prog: &mut BtfTracePoint = program(ebpf, name)?;
        match prog.load(f.what, btf).and_then(|()| prog.attach()) {
            Ok(_) => return Ok(Attachment { mode, program: name, point: f.what, flavour: Flavour::BtfRawTracepoint }),
            Err(e) => {
                tracing::debug!(program = name, error = %e, "tp_btf flavour refused, trying the next");
                last = Some((name, e));
            }
        }
    }
    if let Some(name) = f.raw {
        let prog: &mut RawTracePoint = program(ebpf, name)?;
        match prog.load().and_then(|()| prog.attach(f.what)) {
            Ok(_) => return Ok(Attachment { mode, program: name, point: f.what, flavour: Flavour::RawTracepoint }),
            Err(e) => {
                tracing::debug!(program = name, error = %e, "raw_tracepoint flavour refused, trying the next");
                last = Some((name, e));
            }
        }
    }
    if let Some((name, category, event)) = f.tracepoint {
        let prog: &mut TracePoint = program(ebpf, name)?;
        match prog.load().and_then(|()| prog.attach(category, event)) {
            Ok(_) => return Ok(Attachment { mode, program: name, point: f.what, flavour: Flavour::Tracepoint }),
            Err(e) => last = Some((name, e)),
        }
    }
    match last {
        Some((program, source)) => Err(AttachError::Attach { what: f.what, program, source }),
        None => Err(AttachError::Missing(f.what)),
    }
}

fn attach_syscall(ebpf: &mut Ebpf, btf: &Btf, unwind: bool) -> Result<Vec<Attachment>, AttachError> {
    // Exit first: an exit without a recorded enter is ignored, so no call is
    // half-counted while attaching.
    let exit = Flavours {
        what: "sys_exit",
        btf: Some("ap_sysexit_btf"),
        raw: Some("ap_sysexit_raw"),
        tracepoint: Some(("ap_sysexit_tp", "raw_syscalls", "sys_exit")),
    };
    let enter = Flavours {
        what: "sys_enter",
        btf: Some("ap_sysent_btf"),
        raw: Some("ap_sysent_raw"),
        tracepoint: Some(("ap_sysent_tp", "raw_syscalls", "sys_enter")),
    };
    let exit = attach_first(ebpf, btf, Mode::Syscall, &exit)?;
    if unwind {
        // The step program must have the type of the exit program that won.
        let step = match exit.flavour {
            Flavour::BtfRawTracepoint => {
                install_step::<BtfTracePoint>(ebpf, "ap_sysunw_btf", "ap_sys_unwind_btf", |p| p.load("sys_exit", btf))
            }
            Flavour::RawTracepoint => {
                install_step::<RawTracePoint>(ebpf, "ap_sysunw_raw", "ap_sys_unwind_raw", |p| p.load())
            }
            Flavour::Tracepoint => install_step::<TracePoint>(ebpf, "ap_sysunw_tp", "ap_sys_unwind_tp", |p| p.load()),
            Flavour::PerfEvent => Ok(()),
        };
        if let Err(e) = step {
            tracing::warn!(error = %e, "slow-call stacks fall back to frame pointers");
        }
    }
    Ok(vec![exit, attach_first(ebpf, btf, Mode::Syscall, &enter)?])
}

fn attach_lock(ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<Attachment>, AttachError> {
    let futex_exit = Flavours {
        what: "sys_exit_futex",
        btf: None,
        raw: None,
        tracepoint: Some(("ap_futex_exit", "syscalls", "sys_exit_futex")),
    };
    let futex_enter = Flavours {
        what: "sys_enter_futex",
        btf: None,
        raw: None,
        tracepoint: Some(("ap_futex_enter", "syscalls", "sys_enter_futex")),
    };
    let end =
        Flavours { what: "contention_end", btf: Some("ap_lockend_btf"), raw: Some("ap_lockend_raw"), tracepoint: None };
    let begin = Flavours {
        what: "contention_begin",
        btf: Some("ap_lockbeg_btf"),
        raw: Some("ap_lockbeg_raw"),
        tracepoint: None,
    };
    let mut out =
        vec![attach_first(ebpf, btf, Mode::Lock, &futex_exit)?, attach_first(ebpf, btf, Mode::Lock, &futex_enter)?];
    // lock:contention_* exist since 5.19; without them only futex waits are seen.
    match attach_first(ebpf, btf, Mode::Lock, &end) {
        Ok(a) => {
            out.push(a);
            out.push(attach_first(ebpf, btf, Mode::Lock, &begin)?);
        }
        Err(e) => tracing::warn!(error = %e, "kernel lock contention not available; recording futex waits only"),
    }
    Ok(out)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, AttachError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let prog = ebpf.program_mut(name).ok_or(AttachError::Missing(name))?;
    prog.try_into().map_err(|_| AttachError::Missing(name))
}
