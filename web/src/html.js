// Markup from data that other people wrote (stores, graph JSON files): every value put into a `html` template is
// escaped unless it is itself the result of `html`, and `setHTML` is the only place that writes innerHTML, so a
// string from storage can never become markup (tests/test_explorer_hardening.py checks both).
export class Html {
  constructor(s) { this.s = s; }
  toString() { return this.s; }
}

const ENT = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;", "`": "&#96;" };
export const esc = (s) => String(s ?? "").replace(/[&<>"'`]/g, (c) => ENT[c]);

const part = (v) => (v instanceof Html ? v.s : Array.isArray(v) ? v.map(part).join("") : esc(v));

export function html(strings, ...values) {
  let out = strings[0];
  values.forEach((v, i) => { out += part(v) + strings[i + 1]; });
  return new Html(out);
}

export function setHTML(el, h) {
  if (!(h instanceof Html)) throw new TypeError("setHTML takes html`...` only");
  el.innerHTML = h.s;
}
