/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * aperture.h — every layout shared between Aperture's BPF programs and user
 * space. The Rust side mirrors each struct in `probes/src/abi.rs` with
 * `#[repr(C)]` types and compile-time size asserts: change both together.
 *
 * All integers are little-endian host order; all structs are naturally
 * aligned with explicit padding so that C and Rust agree without packing.
 */
#ifndef __APERTURE_H__
#define __APERTURE_H__

/* Deepest stack captured, per side (kernel, user): the kernel's default
 * kernel.perf_event_max_stack. */
#define AP_MAX_FRAMES 127
/* Length of a task's comm including the terminating NUL. */
#define AP_COMM_LEN 16
/* Buckets of the log2 latency histogram: bucket i counts latencies whose
 * highest set bit (in ns) is bit i; 0 ns goes to bucket 0; bucket 31 also
 * holds everything longer than 2^32 ns. */
#define AP_HIST_BUCKETS 32

/* What an individual event record (struct ap_event) describes. */
enum ap_event_kind {
	/* A cpu-clock sample: both stacks, duration_ns = 0. */
	AP_EVENT_CPU = 1,
	/* A kernel lock wait above the threshold: kernel stack, addr = lock,
	 * arg = LCB_F_* flags, ret = contention_end's ret. */
	AP_EVENT_LOCK_KERNEL = 2,
	/* A futex wait above the threshold: user stack, addr = futex word,
	 * arg = futex op, ret = the syscall's return value. */
	AP_EVENT_LOCK_FUTEX = 3,
	/* A system call above the threshold: user stack, arg = syscall number,
	 * ret = its return value. */
	AP_EVENT_SLOW_SYSCALL = 4,
};

/* Header of every record a program writes to its `ap_events` perf buffer.
 * It is followed by n_kernel kernel addresses then n_user user addresses
 * (u64 each, leaf first); the record is exactly
 * sizeof(struct ap_event) + 8 * (n_kernel + n_user) bytes. 80 bytes. */
struct ap_event {
	__u64 ts_ns;       /* bpf_ktime_get_boot_ns() at the sample or at the end of the wait/call */
	__u64 duration_ns; /* wait or call duration; 0 for cpu samples */
	__s64 ret;         /* see enum ap_event_kind */
	__u64 addr;        /* lock or futex address; 0 otherwise */
	__u64 cgroup_id;   /* bpf_get_current_cgroup_id() */
	__u32 pid;         /* thread group id (user-space "pid") */
	__u32 tid;         /* thread id */
	__u32 cpu;         /* CPU the record was written on */
	__u32 arg;         /* see enum ap_event_kind */
	__u16 kind;        /* enum ap_event_kind */
	__u16 n_kernel;    /* kernel frames following the header */
	__u16 n_user;      /* user frames following the kernel frames */
	__u16 _pad;
	char comm[AP_COMM_LEN];
};

/* Settings user space may change while the programs run: the single entry
 * (key 0) of each object's `ap_settings` array map, written before attach
 * and again whenever the agent adjusts its overhead. 16 bytes. */
struct ap_settings {
	__u64 lock_threshold_ns; /* lock.bpf.c: waits at least this long are also sent individually; 0 disables */
	__u64 slow_threshold_ns; /* syscall.bpf.c: calls at least this long are also sent individually; 0 disables */
};

/* Reasons a program failed to record something; the index into each
 * program's per-CPU `ap_drops` array of __u64 counters. */
enum ap_drop_reason {
	/* Capturing the user stack failed (not counted for kernel threads). */
	AP_DROP_USER_STACK = 0,
	/* Capturing the kernel stack failed. */
	AP_DROP_KERNEL_STACK = 1,
	/* An aggregate, stack or per-thread state map was full. */
	AP_DROP_MAP_FULL = 2,
	/* bpf_perf_event_output failed: the perf buffer was full. */
	AP_DROP_OUTPUT = 3,
	/* An exit/end without a matching enter/begin (attached mid-call,
	 * per-thread state evicted, or mismatched lock). */
	AP_DROP_NO_START = 4,
	/* A stack id could not be taken because of a stack map hash collision. */
	AP_DROP_STACK_COLLISION = 5,
	AP_DROP__COUNT = 6,
};

/* Key of the lock aggregate maps `ap_lock_agg_0/1`. 24 bytes. */
struct ap_lock_key {
	__u32 pid;      /* thread group id */
	__s32 stack_id; /* id in `ap_stacks_<slot>` (kernel stack for kernel locks, frame-pointer user stack for futex); <0: none */
	__u32 flags;    /* LCB_F_* flags for kernel locks; 0 for futex */
	__u32 futex;    /* 1 for futex waits, 0 for kernel locks */
	__u64 ustack;   /* futex waits walked with unwind tables: key in `ap_ustacks_<slot>`; 0: none */
};

/* Value of the lock aggregate maps. 40 bytes. */
struct ap_lock_value {
	__u64 count;    /* number of waits */
	__u64 total_ns; /* sum of wait times */
	__u64 max_ns;   /* longest wait */
	char comm[AP_COMM_LEN]; /* comm of the thread that created the entry */
};

/* Key of the per-CPU syscall aggregate maps `ap_sys_stats_0/1`. 8 bytes. */
struct ap_syscall_key {
	__u32 pid; /* thread group id */
	__u32 nr;  /* syscall number (native x86_64 table) */
};

/* Value of the syscall aggregate maps (one per CPU). 296 bytes. */
struct ap_syscall_value {
	__u64 count;    /* completed calls */
	__u64 errors;   /* calls that returned -4095..-1 */
	__u64 total_ns; /* sum of call durations */
	__u64 hist[AP_HIST_BUCKETS];
	char comm[AP_COMM_LEN];
};

/* Single-entry array `ap_slot`: which of the two aggregate slots (0 or 1)
 * the programs currently write. User space flips it to drain the other. */
struct ap_slot {
	__u32 active;
	__u32 _pad;
};

/* ---- user-space unwinding (unwind.bpf.h) ---- */

/* Marker frames: the last user frame of a stack the walker had to cut,
 * saying why. Never a valid user address. */
/* The depth limit was reached. */
#define AP_FRAME_TRUNCATED 0xffffffffffffff01ULL
/* The caller could not be recovered: no mapping, no unwind rule the
 * walker follows, no frame pointer, or unreadable stack memory. */
#define AP_FRAME_UNKNOWN 0xffffffffffffff02ULL

/* Executable mappings per process the walker searches (binary search). */
#define AP_UNWIND_MAX_MAPPINGS 256
/* Unwind tables loaded at once (index into ap_unwind_tables). */
#define AP_UNWIND_MAX_TABLES 8192
/* No table for a mapping: walk it with frame pointers. */
#define AP_UNWIND_NO_TABLE 0xffffffffU

/* CFA rules of a row (struct ap_unwind_row.kind & AP_CFA_MASK); the Rust
 * builder is aperture_symbolize::unwind. */
#define AP_CFA_MASK 0x07
#define AP_CFA_NONE 0        /* no unwind info covers the address */
#define AP_CFA_RSP 1         /* CFA = rsp + cfa_offset */
#define AP_CFA_RBP 2         /* CFA = rbp + cfa_offset */
#define AP_CFA_PLT 3         /* CFA = rsp + 8, + 8 if (pc & 15) >= cfa_offset */
#define AP_CFA_UNSUPPORTED 4 /* a rule the walker does not follow */
#define AP_CFA_END 5         /* outermost frame */
#define AP_RBP_SAVED 0x08    /* caller's rbp at CFA + 8 * rbp_offset */
#define AP_RBP_UNKNOWN 0x10  /* caller's rbp not recoverable */

/* One unwind row: from pc (object address space) to the next row's pc.
 * Stored as one u64 per entry of an inner array of ap_unwind_tables. 8 bytes. */
struct ap_unwind_row {
	__u32 pc;
	__s16 cfa_offset;
	__s8 rbp_offset;
	__u8 kind;
};

/* One executable mapping of a process. 32 bytes. */
struct ap_unwind_mapping {
	__u64 start; /* first address */
	__u64 end;   /* one past the last */
	__u64 bias;  /* runtime address - bias = address in the object's table */
	__u32 table; /* index into ap_unwind_tables, or AP_UNWIND_NO_TABLE */
	__u32 rows;  /* number of rows of that table */
};

/* Value of ap_unwind_procs (key: thread group id): the process's
 * executable mappings sorted by start. 8200 bytes. */
struct ap_unwind_proc {
	__u32 n;
	__u32 _pad;
	struct ap_unwind_mapping maps[AP_UNWIND_MAX_MAPPINGS];
};

/* Counters of the walker: index into each object's per-CPU ap_unwind_stats. */
enum ap_unwind_stat {
	/* Stacks walked with tables (the process was known). */
	AP_UNW_WALKED = 0,
	/* Stacks of processes without tables yet: kept as frame-pointer stacks. */
	AP_UNW_NO_PROC = 1,
	/* Frames recovered from a table row. */
	AP_UNW_FRAMES_TABLE = 2,
	/* Frames recovered by frame pointer (no table for the mapping). */
	AP_UNW_FRAMES_FP = 3,
	/* Stacks cut at the depth limit ([truncated]). */
	AP_UNW_TRUNCATED = 4,
	/* Stacks cut because a pc was in no known mapping ([unknown]). */
	AP_UNW_NO_MAPPING = 5,
	/* Stacks cut at a rule the walker does not follow ([unknown]). */
	AP_UNW_UNSUPPORTED = 6,
	/* Stacks cut because stack memory could not be read ([unknown]). */
	AP_UNW_READ_FAILED = 7,
	/* Frames whose mapping's table was evicted (walked by frame pointer). */
	AP_UNW_EVICTED = 8,
	/* Stacks cut because frame pointers ended without an outermost frame. */
	AP_UNW_FP_ENDED = 9,
	AP_UNW__COUNT = 10,
};

#endif /* __APERTURE_H__ */
