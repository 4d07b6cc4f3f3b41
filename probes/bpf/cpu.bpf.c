/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * cpu.bpf.c — on-CPU sampling. Attached by user space to one software
 * cpu-clock perf event per online CPU at the configured frequency; each
 * sample writes one AP_EVENT_CPU record with the kernel and user stacks.
 * The idle task (pid 0) is not recorded.
 */
#include "common.bpf.h"

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
	ap_event_submit(ctx, buf, AP_WANT_KERNEL_STACK | AP_WANT_USER_STACK);
	return 0;
}
