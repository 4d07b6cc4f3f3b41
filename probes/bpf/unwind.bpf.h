/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * unwind.bpf.h — walking user stacks with unwind tables built from
 * .eh_frame by user space (aperture_symbolize::unwind), falling back to
 * frame pointers for code without a table.
 *
 * Works on 5.10: no bpf_loop. A walk starts in the program that took the
 * sample (ap_unwind_start), which then tail-calls the object's step
 * program; each step program recovers up to AP_UNWIND_FRAMES_PER_PROG
 * frames and tail-calls itself until the stack ends, so the kernel's
 * limit of 33 tail calls allows far more frames than a record holds. A
 * step program must have the type of the program that started the walk,
 * so every object defines its own with AP_UNWIND_STEP.
 *
 * Per frame: binary search of the process's executable mappings
 * (ap_unwind_procs), then of the mapping's table rows (an inner array of
 * ap_unwind_tables, shared by every object and every process mapping the
 * same file). A stack that has to be cut ends in a marker frame
 * (AP_FRAME_TRUNCATED, AP_FRAME_UNKNOWN), never in a guessed address.
 */
#ifndef __APERTURE_UNWIND_BPF_H__
#define __APERTURE_UNWIND_BPF_H__

/* Frames one step program recovers before tail-calling the next. */
#define AP_UNWIND_FRAMES_PER_PROG 6
/* Binary search steps: 2^9 > AP_UNWIND_MAX_MAPPINGS, 2^24 rows per table. */
#define AP_UNWIND_MAP_STEPS 9
#define AP_UNWIND_ROW_STEPS 24
/* x86_64 THREAD_SIZE without KASAN, for kernels without bpf_task_pt_regs. */
#define AP_THREAD_SIZE 16384

/* Set by user space before load. */
/* Walk user stacks with the tables (else frame pointers via bpf_get_stack). */
const volatile __u32 ap_unwind_enabled = 0;
/* The kernel has bpf_get_current_task_btf and bpf_task_pt_regs (5.15+). */
const volatile __u32 ap_has_task_pt_regs = 0;

/* Rows of one object's table (inner map template: the real inner maps
 * are created by user space, one per object, sized to its rows).
 * Memory-mappable, so user space fills a table with one copy instead of a
 * batch update that costs a copy and a check per row. */
struct ap_unwind_rows {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, AP_UNWIND_MAX_TABLES);
	__type(key, __u32);
	__array(values, struct ap_unwind_rows);
} ap_unwind_tables SEC(".maps");

/* The processes the walker knows (key: thread group id), one hash map
 * created by user space and shared by every object through entry 0 of
 * ap_unwind_procs. Preallocated: before 6.1 the kernel refuses perf_event
 * programs that reach a run-time allocated hash map, also through the inner
 * map of a map of maps. */
struct ap_unwind_procs_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	/* Sizes, not types: clang only emits a forward declaration of a
	 * struct named in an inner map template, which the loader cannot size. */
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct ap_unwind_proc));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct ap_unwind_procs_inner);
} ap_unwind_procs SEC(".maps");

static __always_inline struct ap_unwind_proc *ap_unwind_proc_get(__u32 pid)
{
	__u32 zero = 0;
	void *procs = bpf_map_lookup_elem(&ap_unwind_procs, &zero);
	if (!procs)
		return NULL;
	return bpf_map_lookup_elem(procs, &pid);
}

/* Processes user space should (re)read the mappings of: sampled without
 * tables, or a pc outside every known mapping (dlopen, JIT). Value: the
 * time of the last such sample. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} ap_unwind_missing SEC(".maps");

/* Last time a table was used, for least-recently-sampled eviction. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, AP_UNWIND_MAX_TABLES);
	__type(key, __u32);
	__type(value, __u64);
} ap_unwind_used SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AP_UNW__COUNT);
	__type(key, __u32);
	__type(value, __u64);
} ap_unwind_stats SEC(".maps");

/* The walk in progress on this CPU, carried across tail calls. */
struct ap_unwind_state {
	__u64 pc;
	__u64 sp;
	__u64 bp;
	__u64 hash; /* FNV-1a style hash of the frames so far */
	__u32 n;    /* user frames written */
	__u32 nk;   /* kernel frames before them in the record */
	__u32 pid;
	__u32 tail_calls;
	/* Set by the program that started the walk, for its continuation. */
	__u64 arg0;
	__u64 arg1;
	__u64 arg2;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ap_unwind_state);
} ap_unwind_state SEC(".maps");

#define AP_UNW_MORE 0
#define AP_UNW_STOP 1

static __always_inline void ap_unwind_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&ap_unwind_stats, &stat);
	if (n)
		*n += 1;
}

static __always_inline void ap_unwind_note_missing(__u32 pid)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *seen = bpf_map_lookup_elem(&ap_unwind_missing, &pid);
	/* One write a second per process is enough for user space. */
	if (seen && now - *seen < 1000000000ULL)
		return;
	bpf_map_update_elem(&ap_unwind_missing, &pid, &now, BPF_ANY);
}

struct ap_uregs {
	__u64 ip;
	__u64 sp;
	__u64 bp;
};

/* The user registers of the current task: from the perf event's regs when
 * the sample interrupted user mode, else from the task's saved pt_regs
 * (the task is in the kernel: a system call or an interrupt). */
static __always_inline bool ap_user_regs(void *ctx, bool perf_ctx, struct ap_uregs *out)
{
	if (perf_ctx) {
		/* The context starts with the user-ABI pt_regs (fixed layout, in
		 * u64 words: bp 4, ip 16, cs 17, sp 19). Read by offset, not
		 * through CO-RE: newer kernels make cs a 2-byte union member,
		 * and the verifier refuses narrow context reads. */
		__u64 *regs = ctx;
		if ((regs[17] & 3) == 3) {
			out->ip = regs[16];
			out->sp = regs[19];
			out->bp = regs[4];
			return true;
		}
	}
	struct pt_regs regs;
	void *at;
	if (ap_has_task_pt_regs) {
		at = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	} else {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		void *stack = BPF_CORE_READ(task, stack);
		if (!stack)
			return false;
		at = stack + AP_THREAD_SIZE - sizeof(struct pt_regs);
	}
	if (bpf_probe_read_kernel(&regs, sizeof(regs), at) < 0)
		return false;
	out->ip = regs.ip;
	out->sp = regs.sp;
	out->bp = regs.bp;
	return true;
}

static __always_inline struct ap_unwind_state *ap_unwind_state_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&ap_unwind_state, &zero);
}

/* Prepares a walk of the current task's user stack, written into buf after
 * nk kernel frames. False when there is nothing to walk with (unwinding
 * off, process without tables yet, registers unreadable): the caller then
 * takes the frame-pointer stack. The caller tail-calls its step program
 * next and falls back the same way if that returns. */
static __always_inline bool ap_unwind_start(void *ctx, bool perf_ctx, __u32 pid, __u32 nk)
{
	if (!ap_unwind_enabled)
		return false;
	if (!ap_unwind_proc_get(pid)) {
		ap_unwind_count(AP_UNW_NO_PROC);
		ap_unwind_note_missing(pid);
		return false;
	}
	struct ap_unwind_state *st = ap_unwind_state_get();
	struct ap_uregs regs;
	if (!st || !ap_user_regs(ctx, perf_ctx, &regs))
		return false;
	st->pc = regs.ip;
	st->sp = regs.sp;
	st->bp = regs.bp;
	st->hash = 0xcbf29ce484222325ULL;
	st->n = 0;
	st->nk = nk;
	st->pid = pid;
	st->tail_calls = 0;
	ap_unwind_count(AP_UNW_WALKED);
	return true;
}

/* Appends a frame; false when the record is full. */
static __always_inline bool ap_unwind_push(struct ap_unwind_state *st, struct ap_event_buf *buf, __u64 v)
{
	__u32 i = st->nk + st->n;
	if (st->n >= AP_MAX_FRAMES || i >= 2 * AP_MAX_FRAMES)
		return false;
	buf->stack[i] = v;
	st->n += 1;
	st->hash = (st->hash ^ v) * 0x100000001b3ULL;
	return true;
}

/* Ends the walk with a marker frame and counts why. */
static __always_inline int ap_unwind_cut(struct ap_unwind_state *st, struct ap_event_buf *buf, __u64 marker,
					 __u32 stat)
{
	ap_unwind_count(stat);
	ap_unwind_push(st, buf, marker);
	return AP_UNW_STOP;
}

/* 1 when a <= b, else 0, without a branch: both below 2^63, so the sign
 * of b - a decides. A branch here would double the verifier's states at
 * every search step; the empty asm keeps clang from turning the
 * arithmetic back into a comparison. */
static __always_inline __u64 ap_le(__u64 a, __u64 b)
{
	__u64 d = b - a;
	asm volatile("" : "+r"(d));
	return 1 - (d >> 63);
}

/* The mapping of `proc` containing pc, or NULL: the last one starting at
 * or below pc (a search whose steps do not depend on the comparisons),
 * then checked. */
static __always_inline struct ap_unwind_mapping *ap_unwind_find(struct ap_unwind_proc *proc, __u64 pc)
{
	__u32 len = proc->n;
	if (len == 0)
		return NULL;
	if (len > AP_UNWIND_MAX_MAPPINGS)
		len = AP_UNWIND_MAX_MAPPINGS;
	__u32 base = 0;
	for (int k = 0; k < AP_UNWIND_MAP_STEPS; k++) {
		__u32 half = len >> 1;
		__u64 start = proc->maps[(base + half) & (AP_UNWIND_MAX_MAPPINGS - 1)].start;
		base += half * (__u32)ap_le(start, pc);
		len -= half;
	}
	struct ap_unwind_mapping *m = &proc->maps[base & (AP_UNWIND_MAX_MAPPINGS - 1)];
	return m->start <= pc && pc < m->end ? m : NULL;
}

/* The row of `rows` (an inner table map of n rows) covering rel, or false:
 * the same search over the rows' pcs. */
static __always_inline bool ap_unwind_row(void *rows, __u32 n, __u32 rel, struct ap_unwind_row *out)
{
	__u32 len = n, base = 0;
	if (len == 0)
		return false;
	for (int k = 0; k < AP_UNWIND_ROW_STEPS; k++) {
		if (len <= 1)
			break;
		__u32 half = len >> 1;
		__u32 idx = base + half;
		__u64 *v = bpf_map_lookup_elem(rows, &idx);
		if (!v)
			return false;
		base += half * (__u32)ap_le((__u32)*v, rel);
		len -= half;
	}
	__u64 *v = bpf_map_lookup_elem(rows, &base);
	if (!v)
		return false;
	__u64 r = *v;
	if ((__u32)r > rel)
		return false;
	out->pc = (__u32)r;
	out->cfa_offset = (__s16)(r >> 32);
	out->rbp_offset = (__s8)(r >> 48);
	out->kind = (__u8)(r >> 56);
	return true;
}

/* One frame by frame pointer: the caller's frame is [bp] (its bp) and
 * [bp + 8] (the return address). */
static __always_inline int ap_unwind_fp(struct ap_unwind_state *st, struct ap_event_buf *buf)
{
	__u64 bp = st->bp, frame[2];
	if (bp == 0)
		return AP_UNW_STOP; /* the outermost frame by convention */
	if (bp < st->sp || (bp & 7))
		return ap_unwind_cut(st, buf, AP_FRAME_UNKNOWN, AP_UNW_FP_ENDED);
	if (bpf_probe_read_user(frame, sizeof(frame), (void *)bp) < 0)
		return ap_unwind_cut(st, buf, AP_FRAME_UNKNOWN, AP_UNW_READ_FAILED);
	ap_unwind_count(AP_UNW_FRAMES_FP);
	st->sp = bp + 16;
	st->bp = frame[0];
	st->pc = frame[1];
	return frame[1] ? AP_UNW_MORE : AP_UNW_STOP;
}

/* Records the current pc and recovers its caller's registers. */
static __always_inline int ap_unwind_frame(struct ap_unwind_state *st, struct ap_event_buf *buf,
					   struct ap_unwind_proc *proc)
{
	__u64 pc = st->pc;
	struct ap_unwind_mapping *m = ap_unwind_find(proc, pc);
	if (!m) {
		ap_unwind_note_missing(st->pid);
		return ap_unwind_cut(st, buf, AP_FRAME_UNKNOWN, AP_UNW_NO_MAPPING);
	}
	/* Keep one slot for the marker. */
	if (st->n >= AP_MAX_FRAMES - 1)
		return ap_unwind_cut(st, buf, AP_FRAME_TRUNCATED, AP_UNW_TRUNCATED);
	ap_unwind_push(st, buf, pc);

	/* Above the leaf, pc is a return address: the call is just before it. */
	__u64 at = st->n > 1 ? pc - 1 : pc;
	struct ap_unwind_row row = {};
	bool have = false;
	__u32 table = m->table;
	if (table != AP_UNWIND_NO_TABLE) {
		void *rows = bpf_map_lookup_elem(&ap_unwind_tables, &table);
		if (rows) {
			have = ap_unwind_row(rows, m->rows, (__u32)(at - m->bias), &row);
			__u64 *used = bpf_map_lookup_elem(&ap_unwind_used, &table);
			if (used)
				*used = bpf_ktime_get_ns();
		} else {
			ap_unwind_count(AP_UNW_EVICTED);
		}
	}
	__u8 kind = row.kind & AP_CFA_MASK;
	if (!have || kind == AP_CFA_NONE)
		return ap_unwind_fp(st, buf);
	if (kind == AP_CFA_END)
		return AP_UNW_STOP;

	__u64 cfa;
	if (kind == AP_CFA_RSP)
		cfa = st->sp + row.cfa_offset;
	else if (kind == AP_CFA_RBP)
		cfa = st->bp + row.cfa_offset;
	else if (kind == AP_CFA_PLT)
		cfa = st->sp + (((pc & 15) >= (__u64)row.cfa_offset) ? 16 : 8);
	else
		return ap_unwind_cut(st, buf, AP_FRAME_UNKNOWN, AP_UNW_UNSUPPORTED);

	__u64 ra;
	if (bpf_probe_read_user(&ra, sizeof(ra), (void *)(cfa - 8)) < 0)
		return ap_unwind_cut(st, buf, AP_FRAME_UNKNOWN, AP_UNW_READ_FAILED);
	if (row.kind & AP_RBP_SAVED) {
		__u64 bp;
		if (bpf_probe_read_user(&bp, sizeof(bp), (void *)(cfa + (__s64)row.rbp_offset * 8)) < 0)
			return ap_unwind_cut(st, buf, AP_FRAME_UNKNOWN, AP_UNW_READ_FAILED);
		st->bp = bp;
	} else if (row.kind & AP_RBP_UNKNOWN) {
		st->bp = 0;
	}
	ap_unwind_count(AP_UNW_FRAMES_TABLE);
	st->sp = cfa;
	st->pc = ra;
	return ra ? AP_UNW_MORE : AP_UNW_STOP;
}

/* Up to AP_UNWIND_FRAMES_PER_PROG frames of the walk in progress. */
static __always_inline int ap_unwind_frames(struct ap_unwind_state *st, struct ap_event_buf *buf)
{
	struct ap_unwind_proc *proc = ap_unwind_proc_get(st->pid);
	if (!proc)
		return ap_unwind_cut(st, buf, AP_FRAME_UNKNOWN, AP_UNW_NO_MAPPING);
	for (int i = 0; i < AP_UNWIND_FRAMES_PER_PROG; i++) {
		if (ap_unwind_frame(st, buf, proc) != AP_UNW_MORE)
			return AP_UNW_STOP;
	}
	return AP_UNW_MORE;
}

/* exec replaced the process's mappings: forget them at once (a stale list
 * would send the walker to the old image's tables) and ask user space to
 * read the new ones. Attached from one object only (the map is shared). */
SEC("raw_tracepoint/sched_process_exec")
int ap_unwind_exec(void *ctx)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	__u32 zero = 0;
	void *procs = bpf_map_lookup_elem(&ap_unwind_procs, &zero);
	if (procs && bpf_map_delete_elem(procs, &pid) == 0)
		ap_unwind_note_missing(pid);
	return 0;
}

/* A prog array holding the object's step program at index 0. */
#define AP_UNWIND_PROGS(name)                          \
	struct {                                       \
		__uint(type, BPF_MAP_TYPE_PROG_ARRAY); \
		__uint(max_entries, 1);                \
		__type(key, __u32);                    \
		__type(value, __u32);                  \
	} name SEC(".maps")

/* A step program `name` in section `sec` (the type of the program that
 * starts the walk), continuing through `progs` and calling
 * done(ctx, state, buf) once the stack is complete. */
#define AP_UNWIND_STEP(name, sec, progs, done)                                                   \
	SEC(sec)                                                                                  \
	int name(void *ctx)                                                                       \
	{                                                                                         \
		__u32 zero = 0;                                                                   \
		struct ap_unwind_state *st = ap_unwind_state_get();                               \
		struct ap_event_buf *buf = bpf_map_lookup_elem(&ap_scratch, &zero);               \
		if (!st || !buf)                                                                  \
			return 0;                                                                 \
		if (ap_unwind_frames(st, buf) == AP_UNW_MORE) {                                   \
			st->tail_calls += 1;                                                      \
			bpf_tail_call(ctx, &progs, 0);                                            \
			/* Out of tail calls. */                                                  \
			ap_unwind_cut(st, buf, AP_FRAME_TRUNCATED, AP_UNW_TRUNCATED);             \
		}                                                                                 \
		done(ctx, st, buf);                                                               \
		return 0;                                                                         \
	}

#endif /* __APERTURE_UNWIND_BPF_H__ */
