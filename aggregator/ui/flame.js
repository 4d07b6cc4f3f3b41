// An interactive flame graph drawn on a canvas, root on top (icicle layout):
// click a frame to zoom into it, click an ancestor (or press Escape) to zoom
// out, hover for details, search to highlight. Frames narrower than half a
// pixel are not drawn, nor is anything below them, so trees of many
// thousands of nodes stay smooth.

import { h } from './dom.js';
import { isAncestor, pathOf, search as searchTree } from './tree.js';

const ROW = 20;
const GAP = 1;
const MIN_WIDTH = 0.5;
const TEXT_MIN = 26;
const FONT = '12px ui-sans-serif, system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif';

// Hue ranges [start, span], saturation and lightness [base, spread] of
// user and kernel frames per palette. CPU is warm; kernel frames are cool in
// every palette so they stand out from user code.
const PALETTES = {
  cpu: { user: [4, 44, 82, 62, 12], kernel: [196, 26, 58, 66, 10] },
  lock: { user: [258, 34, 60, 72, 10], kernel: [168, 22, 48, 62, 10] },
  syscall: { user: [82, 52, 46, 62, 12], kernel: [196, 26, 58, 66, 10] },
};

/** Two stable pseudo-random numbers in [0, 1) from a name (FNV-1a). */
function hash(name) {
  let a = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) {
    a ^= name.charCodeAt(i);
    a = Math.imul(a, 0x01000193);
  }
  const b = Math.imul(a ^ (a >>> 15), 0x2c1b3c6d);
  return [(a >>> 0) / 4294967296, ((b ^ (b >>> 12)) >>> 0) / 4294967296];
}

/** The fill of a frame in a palette. */
export function frameColor(node, palette) {
  const p = PALETTES[palette] || PALETTES.cpu;
  const [hs, hw, sat, light, spread] = node.kernel ? p.kernel : p.user;
  const [u, v] = hash(node.name);
  return `hsl(${Math.round(hs + u * hw)}, ${sat}%, ${Math.round(light + (v - 0.5) * spread)}%)`;
}

/** The fill of a diff frame: red for a grown share, blue for a shrunk one. */
export function diffColor(delta, maxAbs) {
  if (!maxAbs || Math.abs(delta) < 0.0005) return 'hsl(220, 12%, 89%)';
  const t = Math.sqrt(Math.min(1, Math.abs(delta) / maxAbs));
  const light = Math.round(91 - 36 * t);
  return delta > 0 ? `hsl(0, 80%, ${light}%)` : `hsl(213, 80%, ${light}%)`;
}

export class FlameGraph {
  /**
   * @param host element the canvas goes in
   * @param options.tooltip a positioned element to fill on hover
   * @param options.describe (node, graph) -> tooltip children
   * @param options.onFocus (path) -> void, after a zoom
   */
  constructor(host, { tooltip, describe, onFocus, label }) {
    // The canvas takes the width of an unpadded box inside the host.
    this.host = h('div', { class: 'flame-box' });
    host.append(this.host);
    this.tooltip = tooltip;
    this.describe = describe;
    this.onFocus = onFocus || (() => {});
    this.canvas = h('canvas', { class: 'flame-canvas', tabindex: '0', role: 'img', 'aria-label': label || 'Flame graph' });
    this.host.append(this.canvas);
    this.ctx = this.canvas.getContext('2d');
    this.data = null;
    this.focus = null;
    this.hover = null;
    this.result = null;
    this.palette = 'cpu';
    this.diff = false;
    this.rows = [];
    this.pending = false;
    this.lastRenderMs = 0;
    this.canvas.addEventListener('mousemove', (e) => this.onMove(e));
    this.canvas.addEventListener('mouseleave', () => this.setHover(null));
    this.canvas.addEventListener('click', (e) => this.onClick(e));
    this.canvas.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') this.zoom(null);
    });
    this.width = 0;
    new ResizeObserver(() => {
      if (this.host.clientWidth !== this.width) this.schedule();
    }).observe(this.host);
  }

  /** Shows a laid-out tree (see tree.js `prepare`). */
  setData(prepared, { palette = 'cpu', diff = false, focus = '', query = '' } = {}) {
    this.data = prepared;
    this.palette = palette;
    this.diff = diff;
    this.hover = null;
    this.focus = focus ? this.nodeAt(focus) : prepared.root;
    this.result = searchTree(prepared, query);
    this.render();
    return this.result;
  }

  /** Highlights the frames matching `query`; returns what matched and its share. */
  setSearch(query) {
    if (!this.data) return null;
    this.result = searchTree(this.data, query);
    this.render();
    return this.result;
  }

  nodeAt(path) {
    let node = this.data.root;
    for (const name of path.split(';')) {
      const next = node.children.find((c) => c.name === name);
      if (!next) break;
      node = next;
    }
    return node;
  }

  /** Zooms onto `node` (null: the root). */
  zoom(node) {
    if (!this.data) return;
    this.focus = node || this.data.root;
    this.hover = null;
    this.hideTooltip();
    this.render();
    this.onFocus(this.focus === this.data.root ? '' : pathOf(this.focus));
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  /** Which frames are drawn where: rows of {node, x, w}, by depth. */
  layout(width) {
    const rows = [];
    const { root } = this.data;
    const focus = this.focus || root;
    for (let n = focus.parent; n; n = n.parent) (rows[n.depth] ||= []).push({ node: n, x: 0, w: width, context: true });
    if (focus.value <= 0) return rows;
    const scale = width / focus.value;
    const x0 = focus.x;
    const stack = [focus];
    while (stack.length) {
      const n = stack.pop();
      const w = n.value * scale;
      if (w < MIN_WIDTH) continue;
      (rows[n.depth] ||= []).push({ node: n, x: (n.x - x0) * scale, w, context: false });
      for (const c of n.children) stack.push(c);
    }
    return rows;
  }

  render() {
    if (!this.data) return;
    const started = performance.now();
    const width = Math.max(200, this.host.clientWidth);
    this.width = this.host.clientWidth;
    this.rows = this.layout(width);
    for (const r of this.rows) if (r) r.sort((a, b) => a.x - b.x);
    const height = Math.max(1, this.rows.length) * ROW + 4;
    const dpr = window.devicePixelRatio || 1;
    const c = this.canvas;
    if (c.width !== Math.round(width * dpr) || c.height !== Math.round(height * dpr)) {
      c.width = Math.round(width * dpr);
      c.height = Math.round(height * dpr);
      c.style.width = `${width}px`;
      c.style.height = `${height}px`;
    }
    const ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = FONT;
    ctx.textBaseline = 'middle';
    const matched = this.result && this.result.matched;
    const searching = matched && matched.size > 0;
    const ellipsisW = ctx.measureText('…').width;
    for (let depth = 0; depth < this.rows.length; depth++) {
      const row = this.rows[depth];
      if (!row) continue;
      const y = depth * ROW;
      for (const r of row) {
        const n = r.node;
        const dim = searching && !matched.has(n);
        let fill = this.fillOf(n);
        if (dim) fill = 'hsl(230, 10%, 90%)';
        r.fill = fill;
        ctx.globalAlpha = r.context ? 0.55 : 1;
        ctx.fillStyle = fill;
        const w = r.w > 3 ? r.w - GAP : r.w;
        ctx.fillRect(r.x, y, w, ROW - GAP);
        if (r.w >= TEXT_MIN) {
          ctx.fillStyle = dim ? '#7d8090' : '#15161a';
          const label = n.parent ? n.name : 'all';
          const text = fit(ctx, label, r.w - 8, ellipsisW);
          if (text) ctx.fillText(text, r.x + 4, y + ROW / 2);
        }
      }
    }
    ctx.globalAlpha = 1;
    if (this.hover) {
      const r = this.rectOf(this.hover);
      if (r) {
        ctx.strokeStyle = '#15161a';
        ctx.lineWidth = 1.5;
        ctx.strokeRect(r.x + 0.75, r.node.depth * ROW + 0.75, Math.max(1, r.w - GAP - 1.5), ROW - GAP - 1.5);
      }
    }
    this.lastRenderMs = performance.now() - started;
  }

  fillOf(n) {
    if (!n.parent) return this.diff ? 'hsl(220, 12%, 86%)' : 'hsl(30, 10%, 80%)';
    if (this.diff) return diffColor(n.delta, this.data.maxAbsDelta);
    return frameColor(n, this.palette);
  }

  rectOf(node) {
    const row = this.rows[node.depth];
    return row ? row.find((r) => r.node === node) : null;
  }

  /** The frame under a point in CSS pixels of the canvas. */
  hit(x, y) {
    const row = this.rows[Math.floor(y / ROW)];
    if (!row) return null;
    let lo = 0;
    let hi = row.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const r = row[mid];
      if (x < r.x) hi = mid - 1;
      else if (x >= r.x + r.w) lo = mid + 1;
      else return r.node;
    }
    return null;
  }

  point(e) {
    const b = this.canvas.getBoundingClientRect();
    return [e.clientX - b.left, e.clientY - b.top];
  }

  onMove(e) {
    const node = this.hit(...this.point(e));
    this.canvas.style.cursor = node ? 'pointer' : 'default';
    if (node !== this.hover) {
      this.hover = node;
      this.schedule();
    }
    if (node) this.showTooltip(node, e.clientX, e.clientY);
    else this.hideTooltip();
  }

  setHover(node) {
    this.hover = node;
    this.hideTooltip();
    this.schedule();
  }

  onClick(e) {
    const node = this.hit(...this.point(e));
    if (!node) return;
    if (node === this.focus && node.parent) this.zoom(node.parent);
    else this.zoom(node);
  }

  showTooltip(node, cx, cy) {
    const t = this.tooltip;
    t.replaceChildren(...[].concat(this.describe(node, this)));
    t.hidden = false;
    const pad = 14;
    const { innerWidth: vw, innerHeight: vh } = window;
    const tw = t.offsetWidth;
    const th = t.offsetHeight;
    let x = cx + pad;
    let y = cy + pad;
    if (x + tw > vw - 8) x = Math.max(8, cx - tw - pad);
    if (y + th > vh - 8) y = Math.max(8, cy - th - pad);
    t.style.left = `${x}px`;
    t.style.top = `${y}px`;
  }

  hideTooltip() {
    this.tooltip.hidden = true;
  }

  /** The drawn frames, for tests and tools: name, path, box in CSS pixels, fill. */
  frames() {
    const out = [];
    const matched = this.result ? this.result.matched : new Set();
    this.rows.forEach((row, depth) => {
      for (const r of row || []) {
        out.push({
          name: r.node.parent ? r.node.name : 'all',
          path: pathOf(r.node),
          x: r.x,
          y: depth * ROW,
          w: r.w,
          h: ROW - GAP,
          fill: r.fill,
          matched: matched.has(r.node),
          context: r.context,
          focus: r.node === this.focus,
          kernel: !!r.node.kernel,
        });
      }
    });
    return out;
  }

  /** Whether `node` is drawn as an ancestor of the zoomed frame. */
  isContext(node) {
    return this.focus && node !== this.focus && isAncestor(node, this.focus);
  }
}

/** `text` cut with an ellipsis to fit `max` pixels, or '' when not even two characters fit. */
function fit(ctx, text, max, ellipsisW) {
  if (max <= 0) return '';
  if (ctx.measureText(text).width <= max) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid)).width + ellipsisW <= max) lo = mid;
    else hi = mid - 1;
  }
  return lo >= 2 ? `${text.slice(0, lo)}…` : '';
}
