// Flame-graph trees: laying out an API tree, building a diff tree from
// per-stack changes, searching, and paths of nodes.

// Kernel entry points and subsystems, for trees that carry no `kernel` flag
// (the plain /profile tree, diffs). The /flamegraph tree flags frames itself.
const KERNEL_NAME = /^(__x64_sys_|__arm64_sys_|__se_sys_|__do_sys_|do_syscall_|entry_SYSCALL|x64_sys_call|ksys_|vfs_|do_sys_|__schedule|schedule|futex_|do_futex|__GI___|tcp_|ip_|sock_|__sys_|ext4_|xfs_|blk_|page_fault|exc_page_fault|asm_exc_|handle_mm_fault|__handle_mm_fault|do_page_fault|irq_|__irq|smp_|native_|_raw_spin|raw_spin|mutex_lock|down_read|down_write|rwsem_)/;

export function looksKernel(name) {
  return KERNEL_NAME.test(name) || name.endsWith('_[k]') || name.startsWith('[kernel');
}

/**
 * Lays a tree out for drawing: parent links, depth, `x` (start offset in
 * value units from the left edge of the root) and levels (nodes by depth).
 * Children are drawn in the order given (the API sorts them by name).
 */
export function prepare(root, { flagKernel = false } = {}) {
  const levels = [];
  let nodes = 0;
  const stack = [[root, null, 0, 0]];
  while (stack.length) {
    const [n, parent, depth, x] = stack.pop();
    n.parent = parent;
    n.depth = depth;
    n.x = x;
    if (n.kernel === undefined && flagKernel) n.kernel = looksKernel(n.name);
    (levels[depth] ||= []).push(n);
    nodes++;
    let cx = x;
    const kids = n.children || (n.children = []);
    const at = [];
    for (const c of kids) {
      at.push([c, n, depth + 1, cx]);
      cx += c.value;
    }
    for (let i = at.length - 1; i >= 0; i--) stack.push(at[i]);
  }
  for (const l of levels) l.sort((a, b) => a.x - b.x);
  return { root, levels, nodes, total: root.value };
}

/**
 * The tree of a diff from the API's per-stack entries (`stack` root first,
 * `;`-separated, `base` and `value`). Each node gets `base` and `cur` and
 * their shares of their range's total; widths are the mean of the two
 * shares, so frames that vanished stay visible; `delta` is the change of
 * share (current − base), what the colours show.
 */
export function diffTree(stacks) {
  let baseTotal = 0;
  let curTotal = 0;
  for (const s of stacks) {
    baseTotal += s.base;
    curTotal += s.value;
  }
  const root = { name: 'root', base: 0, cur: 0, children: [], index: new Map() };
  for (const s of stacks) {
    root.base += s.base;
    root.cur += s.value;
    let node = root;
    for (const name of s.stack.split(';')) {
      let next = node.index.get(name);
      if (!next) {
        next = { name, base: 0, cur: 0, children: [], index: new Map() };
        node.index.set(name, next);
        node.children.push(next);
      }
      next.base += s.base;
      next.cur += s.value;
      node = next;
    }
    node.selfBase = (node.selfBase || 0) + s.base;
    node.selfCur = (node.selfCur || 0) + s.value;
  }
  let maxAbs = 0;
  const walk = (n) => {
    n.children.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    delete n.index;
    n.baseShare = baseTotal ? n.base / baseTotal : 0;
    n.curShare = curTotal ? n.cur / curTotal : 0;
    const parts = (baseTotal ? 1 : 0) + (curTotal ? 1 : 0);
    n.value = parts ? (n.baseShare + n.curShare) / parts : 0;
    n.delta = n.curShare - n.baseShare;
    if (n !== root) maxAbs = Math.max(maxAbs, Math.abs(n.delta));
    n.children.forEach(walk);
  };
  walk(root);
  const prepared = prepare(root, { flagKernel: true });
  prepared.baseTotal = baseTotal;
  prepared.curTotal = curTotal;
  prepared.maxAbsDelta = maxAbs;
  return prepared;
}

/** A matcher for a search: `/re/` is a regular expression, else a case-insensitive substring. */
export function matcher(query) {
  const q = (query || '').trim();
  if (!q) return null;
  const re = /^\/(.+)\/([imsu]*)$/.exec(q);
  if (re) {
    try {
      const r = new RegExp(re[1], re[2].includes('i') ? re[2] : `${re[2]}i`);
      return (name) => r.test(name);
    } catch {
      return () => false;
    }
  }
  const lower = q.toLowerCase();
  return (name) => name.toLowerCase().includes(lower);
}

/**
 * Nodes whose name matches, and the share of the total they stand for:
 * a match inside another match is counted once.
 */
export function search(prepared, query) {
  const m = matcher(query);
  const matched = new Set();
  if (!m) return { matched, value: 0, share: 0, names: 0, frames: 0 };
  let value = 0;
  const names = new Set();
  const walk = (n, inside) => {
    const hit = n.parent !== null && m(n.name);
    if (hit) {
      matched.add(n);
      names.add(n.name);
      if (!inside) value += n.value;
    }
    for (const c of n.children) walk(c, inside || hit);
  };
  walk(prepared.root, false);
  const total = prepared.root.value;
  return { matched, value, share: total ? value / total : 0, names: names.size, frames: matched.size };
}

/** Names from the root (excluded) to `node`, `;`-separated. */
export function pathOf(node) {
  const names = [];
  for (let n = node; n && n.parent; n = n.parent) names.push(n.name);
  return names.reverse().join(';');
}

/** The node at a path, or the deepest node found along it. */
export function find(prepared, path) {
  let node = prepared.root;
  if (!path) return node;
  for (const name of path.split(';')) {
    const next = node.children.find((c) => c.name === name);
    if (!next) break;
    node = next;
  }
  return node;
}

/** Whether `a` is `b` or one of its ancestors. */
export function isAncestor(a, b) {
  for (let n = b; n; n = n.parent) if (n === a) return true;
  return false;
}
