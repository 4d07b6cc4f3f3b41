// The query API client: bearer token from the tab's session storage, errors
// that say what the aggregator answered, and downloads that keep the token
// out of URLs.

const TOKEN_KEY = 'aperture.token';

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || '',
  set: (t) => sessionStorage.setItem(TOKEN_KEY, t),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/**
 * Signs in from a link of the form `/#token=<token>` (what `aperture up`
 * prints): the token moves into this tab's session storage and the fragment
 * leaves the address bar and the history entry. A fragment is never sent to
 * the server, so the token stays out of its logs. Call before any request.
 * Returns whether a token was taken from the link.
 */
export function adoptTokenFromFragment(loc = window.location, hist = window.history) {
  const hash = loc.hash.startsWith('#') ? loc.hash.slice(1) : loc.hash;
  if (!hash) return false;
  const params = new URLSearchParams(hash);
  if (!params.has('token')) return false;
  const t = params.get('token') || '';
  params.delete('token');
  const rest = params.toString();
  hist.replaceState(hist.state, '', `${loc.pathname}${loc.search}${rest ? `#${rest}` : ''}`);
  if (!t) return false;
  token.set(t);
  return true;
}

/** A request the aggregator refused or could not answer. */
export class ApiError extends Error {
  constructor(status, message, path) {
    super(message);
    this.status = status;
    this.path = path;
  }

  /** A short title for an error panel. */
  get title() {
    if (this.status === 0) return 'Cannot reach the aggregator';
    if (this.status === 400) return 'The aggregator rejected the request';
    if (this.status === 401) return 'Access token required';
    if (this.status === 503) return 'The aggregator cannot answer right now';
    return `The aggregator answered ${this.status}`;
  }
}

/** Builds `/api/v1/<path>?<params>`, leaving empty parameters out. */
export function url(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return `/api/v1/${path}${s ? `?${s}` : ''}`;
}

async function request(path, params, signal) {
  const headers = {};
  const t = token.get();
  if (t) headers.Authorization = `Bearer ${t}`;
  const target = url(path, params);
  let r;
  try {
    r = await fetch(target, { headers, signal, cache: 'no-store' });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, `The request to ${target.split('?')[0]} failed: ${e.message}. Is the aggregator running?`, path);
  }
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try {
      const body = await r.json();
      if (body && body.error) message = body.error;
    } catch {
      /* not JSON: keep the status line */
    }
    throw new ApiError(r.status, message, path);
  }
  return r;
}

/** GET returning parsed JSON. */
export async function getJson(path, params, signal) {
  const r = await request(path, params, signal);
  return r.json();
}

/** GET the body as a blob and save it under `filename`. */
export async function download(path, params, filename) {
  const r = await request(path, params);
  const blob = await r.blob();
  const href = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10_000);
}
