// Sortable data tables: click a header to sort (again to reverse), optional
// inline bars showing a row's share, optional row click.

import { h, fill } from './dom.js';

/**
 * columns: [{ key, label, numeric, value(row), render(row), share(row) (0..1, draws a bar), title(row) }]
 */
export class SortableTable {
  constructor(host, { columns, sort, onRowClick, onSort, rowTitle, caption }) {
    this.host = host;
    this.columns = columns;
    this.sort = sort || { key: columns[0].key, desc: false };
    this.onRowClick = onRowClick;
    this.onSort = onSort;
    this.rowTitle = rowTitle;
    this.caption = caption;
    this.rows = [];
    this.selected = null;
  }

  setRows(rows) {
    this.rows = rows;
    this.render();
  }

  setSort(key, desc) {
    this.sort = { key, desc };
    this.render();
  }

  sorted() {
    const col = this.columns.find((c) => c.key === this.sort.key) || this.columns[0];
    const get = col.value || ((r) => r[col.key]);
    const dir = this.sort.desc ? -1 : 1;
    return [...this.rows].sort((a, b) => {
      const x = get(a);
      const y = get(b);
      if (x < y) return -dir;
      if (x > y) return dir;
      return 0;
    });
  }

  clickHeader(col) {
    const desc = this.sort.key === col.key ? !this.sort.desc : !!col.numeric;
    this.sort = { key: col.key, desc };
    if (this.onSort) this.onSort(this.sort);
    this.render();
  }

  render() {
    const head = h(
      'tr',
      {},
      this.columns.map((col) => {
        const active = this.sort.key === col.key;
        const arrow = active ? (this.sort.desc ? '▼' : '▲') : '';
        return h(
          'th',
          {
            class: `${col.numeric ? 'num' : ''} ${active ? 'sorted' : ''}`,
            'aria-sort': active ? (this.sort.desc ? 'descending' : 'ascending') : 'none',
            scope: 'col',
          },
          h('button', { type: 'button', class: 'th-button', onclick: () => this.clickHeader(col), title: `Sort by ${col.label.toLowerCase()}` }, col.label, h('span', { class: 'arrow', 'aria-hidden': 'true' }, arrow)),
        );
      }),
    );
    const body = this.sorted().map((row) =>
      h(
        'tr',
        {
          class: `${this.onRowClick ? 'clickable' : ''} ${this.selected !== null && this.selected === rowKey(row) ? 'selected' : ''}`,
          title: this.rowTitle ? this.rowTitle(row) : undefined,
          tabindex: this.onRowClick ? '0' : undefined,
          onclick: this.onRowClick ? () => this.onRowClick(row) : undefined,
          onkeydown: this.onRowClick ? (e) => e.key === 'Enter' && this.onRowClick(row) : undefined,
        },
        this.columns.map((col) => cell(col, row)),
      ),
    );
    fill(this.host, h('table', { class: 'data' }, this.caption ? h('caption', { class: 'sr-only' }, this.caption) : null, h('thead', {}, head), h('tbody', {}, body)));
  }
}

function rowKey(row) {
  return row.name ?? row.stack ?? row.function;
}

function cell(col, row) {
  const content = col.render ? col.render(row) : String(row[col.key]);
  const cls = col.numeric ? 'num' : '';
  if (!col.share) return h('td', { class: cls }, content);
  const share = Math.max(0, Math.min(1, col.share(row) || 0));
  const bar = h('span', { class: 'bar-fill' });
  bar.style.width = `${(share * 100).toFixed(2)}%`;
  return h('td', { class: `${cls} with-bar` }, h('div', { class: 'bar' }, h('span', { class: 'bar-track', 'aria-hidden': 'true' }, bar), h('span', { class: 'bar-text' }, content)));
}
