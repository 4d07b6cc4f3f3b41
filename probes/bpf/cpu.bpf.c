/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * cpu.bpf.c — on-CPU sampling. Attached by user space to one software
 * cpu-clock perf event per online CPU at the configured frequency; each
 * sample writes one AP_EVENT_CPU record with the kernel and user stacks.
 * The idle task (pid 0) is not recorded. User stacks are walked with the
 * unwind tables (unwind.bpf.h) when user space enabled it.
 */
#include "common.bpf.h"

AP_UNWIND_PROGS(ap_cpu_unwind_progs);

static __always_inline void ap_cpu_done(void *ctx, struct ap_unwind_state *st, struct ap_event_buf *buf)
{
	ap_event_output(ctx, buf, st->nk, st->n);
}

AP_UNWIND_STEP(ap_cpu_unwind, "perf_event", ap_cpu_unwind_progs, ap_cpu_done)

SEC("perf_event")
int ap_cpu_sample(struct bpf_perf_event_data *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;

	if (tgid == 0 || !ap_wanted(tgid))
		return 0;
	struct ap_event_buf *buf = ap_event_begin(AP_EVENT_CPU, id);
	if (!buf)
		return 0;
	AP_EVENT_SUBMIT_UNWOUND(ctx, true, buf, AP_WANT_KERNEL_STACK | AP_WANT_USER_STACK, &ap_cpu_unwind_progs);
	return 0;
}
