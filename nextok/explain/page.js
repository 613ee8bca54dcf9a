/* nextok explain: renders the embedded trace data. No network, no dependencies.
   page.js, then beam.js, are pasted into one function in page.html, which then calls start().
   Light by construction: the text is one span per step, the candidate table is drawn only for the
   selected step, and the beam tree is drawn in column chunks as they scroll into view. */
var started = performance.now();
var DATA = JSON.parse(document.getElementById("trace-data").textContent);
var VOCAB = DATA.vocab;
var STAGE = { model: "model", penalties: "penalties", temperature: "temperature", top_k: "top-k",
  top_p: "top-p", min_p: "min-p", typical: "typical" };
var CUTS = { top_k: 1, top_p: 1, min_p: 1, typical: 1 };
var STATUS = ["kept", "finished", "pruned"];

function tokText(id) { var s = VOCAB[id]; return s === undefined ? "<" + id + ">" : s; }
function shown(s) { return s.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205"; }
function esc(s) {
  return String(s).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; });
}
function pct(p) {
  if (p <= 0) return "0";
  if (p >= 0.995) return "100%";
  if (p >= 0.1) return (p * 100).toFixed(1) + "%";
  if (p >= 0.001) return (p * 100).toFixed(2) + "%";
  return "<0.1%";
}
function num(x) { return x <= -1e8 ? "-inf" : x.toFixed(3); }
// RdYlBu: unlikely tokens warm, likely tokens cool; light enough for dark text.
var LOW = [244, 165, 130], MID = [255, 250, 200], HIGH = [146, 197, 222];
function colour(p) {
  var a = p < 0.5 ? LOW : MID, b = p < 0.5 ? MID : HIGH, f = p < 0.5 ? p * 2 : (p - 0.5) * 2;
  return "rgb(" + [0, 1, 2].map(function (i) { return Math.round(a[i] + (b[i] - a[i]) * f); }).join(",") + ")";
}
function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function paramSummary(t) {
  var p = t.params, parts = ["max " + p.max_new_tokens + " tokens"];
  if (p.num_beams > 1) parts.push(p.num_beams + " beams", "length_penalty " + p.length_penalty,
    "early_stopping " + p.early_stopping);
  if (p.do_sample) {
    parts.push("temperature " + p.temperature, p.top_k ? "top-k " + p.top_k : "top-k off");
    if (p.top_p < 1) parts.push("top-p " + p.top_p);
    if (p.min_p) parts.push("min-p " + p.min_p);
    if (p.typical_p < 1) parts.push("typical " + p.typical_p);
    parts.push("seed " + t.seed);
  }
  if (p.repetition_penalty !== 1) parts.push("repetition_penalty " + p.repetition_penalty);
  if (p.no_repeat_ngram_size) parts.push("no_repeat_ngram " + p.no_repeat_ngram_size);
  return parts.join(" \u00b7 ");
}

// ------------------------------------------------------------------ a candidate table
// rows: [{token, probs: [per stage], extra: {...}}]; ranked: how many rows follow the ranking.
function candidateTable(stages, rows, ranked, rest, kept, chosen, extraCols, params) {
  var cuts = [];  // [position, label]
  stages.forEach(function (s, i) {
    if (!CUTS[s] || i === 0) return;
    var n = 0;
    while (n < ranked && rows[n].probs[i] > 0) n++;
    var later = false;
    for (var j = n; j < ranked; j++) if (rows[j].probs[i] <= 0) { later = true; break; }
    var label = STAGE[s] + (s === "top_k" ? " = " + params.top_k : s === "top_p" ? " = " + params.top_p :
      s === "min_p" ? " = " + params.min_p : "") + " cut: keeps " + kept[i].toLocaleString() + " tokens";
    if (later) cuts.push([n, label]);
  });
  var cols = stages.length + extraCols.length + 2;
  var h = ['<table class="cands"><colgroup><col style="width:24px"><col style="width:' + (stages.length > 2 ? 20 : 26) +
    '%">'];
  stages.forEach(function () { h.push("<col>"); });
  extraCols.forEach(function (c) { h.push('<col style="width:' + (c.width || 58) + 'px">'); });
  h.push("</colgroup><thead><tr><th>#</th><th>token</th>");
  stages.forEach(function (s) { h.push("<th>" + esc(STAGE[s] || s) + "</th>"); });
  extraCols.forEach(function (c) { h.push("<th>" + esc(c.title) + "</th>"); });
  h.push("</tr></thead><tbody>");
  rows.forEach(function (r, i) {
    cuts.forEach(function (c) { if (c[0] === i) h.push('<tr class="cut"><td colspan="' + cols + '">' + esc(c[1]) + "</td></tr>"); });
    if (i === ranked) h.push('<tr class="more"><td colspan="' + cols + '">\u22ef further down the ranking</td></tr>');
    var last = r.probs[r.probs.length - 1];
    h.push('<tr class="' + (r.token === chosen ? "chosen" : "") + (last <= 0 ? " gone" : "") + '"><td class="num">' +
      (i < ranked ? i + 1 : "") + '</td><td class="tk" title="id ' + r.token + '">' + esc(shown(tokText(r.token))) + "</td>");
    r.probs.forEach(function (p, s) {
      h.push('<td><div class="bar' + (s === 0 ? " model" : "") + '"><i style="width:' + (p * 100).toFixed(1) +
        '%"></i><span>' + (p <= 0 && s > 0 ? "cut" : pct(p)) + "</span></div></td>");
    });
    extraCols.forEach(function (c) { h.push(c.cell(r)); });
    h.push("</tr>");
  });
  h.push('<tr class="more"><td></td><td>other tokens</td>');
  rest.forEach(function (p) { h.push('<td><div class="bar model"><i style="width:' + (p * 100).toFixed(1) + '%"></i><span>' + pct(p) + "</span></div></td>"); });
  extraCols.forEach(function () { h.push("<td></td>"); });
  h.push("</tr></tbody></table>");
  var notes = [];
  stages.forEach(function (s, i) {
    if (CUTS[s] && i > 0 && kept[i] > ranked && kept[i] < kept[0]) notes.push(STAGE[s] + " keeps " + kept[i].toLocaleString() + " tokens, beyond the list");
  });
  if (notes.length) h.push('<p class="note">' + esc(notes.join("; ")) + "</p>");
  return h.join("");
}

// ------------------------------------------------------------------ one panel per trace
function Panel(trace, index) {
  this.t = trace;
  this.beam = trace.beam || null;
  var root = this.root = el("section", "panel");
  root.id = "panel-" + index;
  root.dataset.strategy = trace.strategy;
  root.appendChild(el("h2", null, trace.label || trace.strategy));
  var out = trace.outputs[0];
  root.appendChild(el("div", "meta", paramSummary(trace) + (out ? " \u2014 finish: " + out.finish_reason +
    ", score " + out.score.toFixed(3) : "")));
  this.text = el("div", "text");
  this.text.setAttribute("role", "listbox");
  this.text.setAttribute("aria-label", (trace.label || trace.strategy) + ": generated tokens");
  root.appendChild(this.text);
  if (this.beam) this.buildBeam();
  root.appendChild(el("h3", null, "Candidates at the selected step"));
  this.detail = el("div", "detail");
  this.detail.setAttribute("aria-live", "polite");
  root.appendChild(this.detail);
  if (this.beam) this.showHypothesis(0); else this.buildText(trace.steps.map(function (s) { return s[0]; }), null);
  this.select(0);
}

Panel.prototype.buildText = function (tokens, path) {
  var self = this, frag = document.createDocumentFragment();
  frag.appendChild(el("span", "prompt-text", DATA.prompt || ""));
  this.spans = tokens.map(function (tok, i) {
    var span = el("span", "tok", tokText(tok));
    var p = self.modelProb(i, tok, path);
    span.style.background = colour(p);
    span.title = "step " + (i + 1) + " \u00b7 p = " + pct(p);
    span.dataset.step = i;
    span.setAttribute("role", "option");
    span.setAttribute("aria-selected", "false");
    span.tabIndex = -1;
    frag.appendChild(span);
    return span;
  });
  this.text.textContent = "";
  this.text.appendChild(frag);
  this.text.onclick = function (e) { var s = e.target.closest(".tok"); if (s) self.select(+s.dataset.step, true); };
  this.text.onkeydown = function (e) { self.key(e); };
  if (!this.spans.length) this.text.tabIndex = 0;
};

Panel.prototype.modelProb = function (i, tok, path) {
  var cands = path ? this.node(path[i][0], path[i][1])[3] : this.t.steps[i][2];
  for (var j = 0; j < cands.length; j++) {
    var c = cands[j];
    if (c[0] === tok) return path ? c[6] : c[1];
  }
  return 0;
};

Panel.prototype.key = function (e) {
  var n = this.spans.length, i = this.current;
  var next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: n - 1 }[e.key];
  if (next === undefined || !n) return;
  e.preventDefault();
  this.select(Math.max(0, Math.min(n - 1, next)), true);
};

Panel.prototype.select = function (i, focus) {
  if (!this.spans.length) { this.detail.textContent = "No tokens were generated."; return; }
  if (this.current !== undefined && this.spans[this.current]) {
    this.spans[this.current].setAttribute("aria-selected", "false");
    this.spans[this.current].tabIndex = -1;
  }
  this.current = i;
  var span = this.spans[i];
  span.setAttribute("aria-selected", "true");
  span.tabIndex = 0;
  if (focus) span.focus();
  if (this.beam) { var at = this.path[i]; this.selectNode(at[0], at[1], false); } else this.renderStep(i);
};

Panel.prototype.renderStep = function (i) {
  var t = this.t, s = t.steps[i], tok = s[0], cands = s[2];
  var rows = cands.map(function (c) { return { token: c[0], probs: c.slice(1) }; });
  var rank = 0;
  for (; rank < rows.length && rows[rank].token !== tok; rank++);
  var last = t.stages.length - 1, why;
  if (s[1] === "argmax") why = "the most likely token (greedy argmax)";
  else why = "sampled from the " + s[4][last].toLocaleString() + " tokens left after the cuts (its probability there: " +
    pct(rows[rank].probs[last]) + ")";
  this.detail.innerHTML = '<p class="head">Step ' + (i + 1) + ": <b>" + esc(shown(tokText(tok))) + "</b> \u2014 " +
    esc(why) + "</p>" + candidateTable(t.stages, rows, Math.min(t.top, rows.length), s[3], s[4], tok, [], t.params);
};

// ------------------------------------------------------------------ start (called last, after beam.js)
function start() {
  var main = document.getElementById("panels");
  var panels = DATA.traces.map(function (t, i) { var p = new Panel(t, i); main.appendChild(p.root); return p; });
  // page.html#step=N opens every panel at step N (a link to a moment of the decoding).
  var at = /(?:^#|&)step=(\d+)/.exec(location.hash);
  if (at) panels.forEach(function (p) { if (p.spans.length) p.select(Math.max(1, Math.min(p.spans.length, +at[1])) - 1); });
  window.nextokPanels = panels;
  document.body.dataset.initMs = (performance.now() - started).toFixed(1);
  document.body.dataset.ready = "true";
}
