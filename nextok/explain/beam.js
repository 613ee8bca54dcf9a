/* nextok explain, beam search: the beam tree (SVG, drawn in column chunks as they scroll into view),
   the finished hypotheses and a beam's candidates. Pasted after page.js, sharing its scope. */
Panel.prototype.node = function (step, b) { return this.beam.steps[step][b]; };

Panel.prototype.buildBeam = function () {
  var self = this, beam = this.beam, steps = beam.steps;
  this.root.appendChild(el("h3", null, "Beam tree \u2014 click a node, or focus the tree and use the arrow keys"));
  // Hypotheses that finish before the end sit in a lane under the beams, in the column after
  // their step; those of the last step take the free column after it, in the beams' rows.
  var lanes = {}, lastColumn = steps.length;
  beam.hyps.forEach(function (h, k) { (lanes[h[0] + 1] = lanes[h[0] + 1] || []).push(k); });
  var maxLane = 0;
  Object.keys(lanes).forEach(function (c) { if (+c !== lastColumn) maxLane = Math.max(maxLane, lanes[c].length); });
  this.lanes = lanes;
  var G = this.geom = { dx: 74, dy: 26, dl: 18, px: 14, py: 16, nb: beam.nb, lane: maxLane };
  G.width = G.px * 2 + (steps.length + 1) * G.dx + 90;
  G.laneTop = G.py + (beam.nb - 1) * G.dy + 14;
  G.height = maxLane ? G.laneTop + maxLane * G.dl + 10 : G.py + (beam.nb - 1) * G.dy + 14;
  var wrap = this.treeWrap = el("div", "tree-wrap");
  wrap.tabIndex = 0;
  wrap.setAttribute("role", "group");
  wrap.setAttribute("aria-label", "beam tree: " + steps.length + " steps, " + beam.nb + " beams, " + beam.hyps.length +
    " finished hypotheses");
  var ns = "http://www.w3.org/2000/svg";
  var svg = this.svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "beam-tree");
  svg.setAttribute("width", G.width);
  svg.setAttribute("height", G.height);
  svg.dataset.steps = steps.length;
  svg.innerHTML = '<rect class="lane" x="0" y="' + (G.laneTop - 4) + '" width="' + G.width +
    '" height="' + (maxLane ? maxLane * G.dl + 8 : 0) + '"></rect><path class="e-best"></path><circle class="sel" r="7" cx="-20" cy="-20"></circle>';
  this.best = svg.querySelector(".e-best");
  this.ring = svg.querySelector(".sel");
  wrap.appendChild(svg);
  this.root.appendChild(wrap);
  this.chunks = {};
  this.chunkSize = 24;
  var pending = false;
  wrap.addEventListener("scroll", function () {
    if (pending) return;
    pending = true;
    requestAnimationFrame(function () { pending = false; self.drawVisible(); });
  });
  svg.addEventListener("click", function (e) { self.treeClick(e); });
  wrap.addEventListener("keydown", function (e) { self.treeKey(e); });
  this.root.appendChild(el("h3", null, "Finished hypotheses (best first; score = log-prob / length^length_penalty)"));
  var list = this.hypList = el("ul", "hyps");
  beam.hyps.forEach(function (h, k) {
    if (!h[4] && k >= beam.nb) return;
    var li = el("li");
    li.dataset.hyp = k;
    li.tabIndex = 0;
    li.innerHTML = '<span class="score">' + h[3].toFixed(3) + "</span>" + (h[4] ? "" : "(evicted) ") +
      esc(self.hypText(k));
    list.appendChild(li);
  });
  list.onclick = function (e) { var li = e.target.closest("li"); if (li) { self.showHypothesis(+li.dataset.hyp); self.select(0); } };
  list.onkeydown = function (e) { if (e.key === "Enter") { var li = e.target.closest("li"); if (li) { self.showHypothesis(+li.dataset.hyp); self.select(0); } } };
  this.root.appendChild(list);
  this.drawVisible();
};

Panel.prototype.hypPath = function (k) {
  var h = this.beam.hyps[k], step = h[0], b = h[1], path = [[step, b]];
  while (step > 0) { b = this.node(step, b)[0]; step--; path.push([step, b]); }
  return path.reverse();
};

Panel.prototype.hypText = function (k) {
  var self = this, h = this.beam.hyps[k];
  var toks = this.hypPath(k).slice(1).map(function (p) { return self.node(p[0], p[1])[1]; });
  toks.push(h[2]);
  return toks.map(tokText).join("");
};

Panel.prototype.showHypothesis = function (k) {
  if (!this.beam.hyps.length) { this.path = []; this.buildText([], []); return; }
  var self = this, h = this.beam.hyps[k], path = this.path = this.hypPath(k);
  var tokens = path.slice(1).map(function (p) { return self.node(p[0], p[1])[1]; });
  tokens.push(h[2]);
  this.shownHyp = k;
  this.buildText(tokens, path);
  var pts = path.map(function (p) { return self.xy(p[0], p[1]); });
  pts.push(this.leafXY(k));
  this.best.setAttribute("d", "M" + pts.map(function (p) { return p[0] + "," + p[1]; }).join("L"));
  Array.prototype.forEach.call(this.hypList.children, function (li) { li.setAttribute("aria-current", String(+li.dataset.hyp === k)); });
  this.current = undefined;
};

Panel.prototype.xy = function (step, b) { var G = this.geom; return [G.px + step * G.dx, G.py + b * G.dy]; };
Panel.prototype.leafXY = function (k) {
  var h = this.beam.hyps[k], G = this.geom, lane = this.lanes[h[0] + 1].indexOf(k);
  if (h[0] + 1 === this.beam.steps.length) return [G.px + (h[0] + 1) * G.dx, G.py + lane * G.dy];
  return [G.px + (h[0] + 1) * G.dx, G.laneTop + (lane + 0.5) * G.dl];
};

Panel.prototype.drawVisible = function () {
  var w = this.treeWrap, G = this.geom, size = this.chunkSize * G.dx;
  var from = Math.max(0, Math.floor((w.scrollLeft - 200) / size));
  var to = Math.floor((w.scrollLeft + (w.clientWidth || 1200) + 200) / size);
  for (var c = from; c <= to; c++) if (!this.chunks[c] && c * this.chunkSize < this.beam.steps.length) this.drawChunk(c);
};

Panel.prototype.drawChunk = function (c) {
  this.chunks[c] = true;
  var self = this, beam = this.beam, G = this.geom, hyps = beam.hyps;
  var start = c * this.chunkSize, end = Math.min(beam.steps.length, start + this.chunkSize);
  var kept = [], fin = [], live = [], dead = [], labels = [], finNodes = [], oldNodes = [];
  var leafOf = {};
  hyps.forEach(function (h, k) { if (h[0] >= start && h[0] < end) (leafOf[h[0] + "," + h[1]] = leafOf[h[0] + "," + h[1]] || []).push(k); });
  for (var step = start; step < end; step++) {
    beam.steps[step].forEach(function (node, b) {
      var p = self.xy(step, b), alive = false;
      node[3].forEach(function (cand) {
        if (cand[1] === 0 && cand[3] >= 0) { var q = self.xy(step + 1, cand[3]); kept.push("M" + p + "L" + q); alive = true; }
        else if (cand[1] === 1) alive = true;
      });
      (leafOf[step + "," + b] || []).forEach(function (k) {
        var q = self.leafXY(k), h = hyps[k];
        fin.push("M" + p + "L" + q);
        (h[4] ? finNodes : oldNodes).push(q);
        labels.push('<text class="fin" x="' + (q[0] + 6) + '" y="' + (q[1] + 4) + '">' + esc(shown(tokText(h[2])).slice(0, 8)) +
          " " + h[3].toFixed(2) + "</text>");
      });
      var last = step === beam.steps.length - 1;
      (alive || last ? live : dead).push(p);
      if (step > 0) labels.push('<text' + (alive || last ? "" : ' class="dead"') + ' x="' + (p[0] + 5) + '" y="' + (p[1] - 5) + '">' +
        esc(shown(tokText(node[1])).slice(0, 9)) + "</text>");
      else labels.push('<text x="' + (p[0] + 5) + '" y="' + (p[1] - 5) + '">prompt</text>');
    });
  }
  function dots(ps, r) { return ps.map(function (p) { return "M" + (p[0] - r) + "," + p[1] + "a" + r + "," + r + " 0 1,0 " + 2 * r + ",0a" + r + "," + r + " 0 1,0 " + -2 * r + ",0"; }).join(""); }
  function crosses(ps) { return ps.map(function (p) { return "M" + (p[0] - 3) + "," + (p[1] - 3) + "l6,6m0,-6l-6,6"; }).join(""); }
  var g = document.createElementNS("http://www.w3.org/2000/svg", "g");
  g.setAttribute("class", "chunk");
  g.dataset.from = start;
  g.dataset.to = end;
  g.innerHTML = '<path class="e-kept" d="' + kept.join("") + '"></path><path class="e-fin" d="' + fin.join("") + '"></path>' +
    '<path class="n-live" d="' + dots(live, 3) + '"></path><path class="n-dead" d="' + crosses(dead) + '"></path>' +
    '<path class="n-fin" d="' + dots(finNodes, 4) + '"></path><path class="n-old" d="' + dots(oldNodes, 3) + '"></path>' +
    labels.join("");
  this.svg.insertBefore(g, this.best);
};

Panel.prototype.treeClick = function (e) {
  var r = this.svg.getBoundingClientRect(), G = this.geom;
  var x = e.clientX - r.left, y = e.clientY - r.top;
  var step = Math.round((x - G.px) / G.dx), row = Math.round((y - G.py) / G.dy);
  var last = step === this.beam.steps.length;
  if (last || y > G.laneTop - 4) {  // a finished hypothesis: show it
    var k = (this.lanes[step] || [])[last ? row : Math.floor((y - G.laneTop) / G.dl)];
    if (k !== undefined) { this.showHypothesis(k); this.select(this.path.length - 1); }
    return;
  }
  if (step >= 0 && step < this.beam.steps.length && row >= 0 && row < this.beam.steps[step].length) this.selectNode(step, row, true);
};

Panel.prototype.treeKey = function (e) {
  var s = this.sel, steps = this.beam.steps;
  if (!s) return;
  var step = s[0], b = s[1];
  if (e.key === "ArrowRight") step++; else if (e.key === "ArrowLeft") step--;
  else if (e.key === "ArrowDown") b++; else if (e.key === "ArrowUp") b--; else return;
  e.preventDefault();
  if (step < 0 || step >= steps.length) return;
  b = Math.max(0, Math.min(steps[step].length - 1, b));
  this.selectNode(step, b, true);
};

Panel.prototype.selectNode = function (step, b, fromTree) {
  this.sel = [step, b];
  var p = this.xy(step, b), w = this.treeWrap;
  this.ring.setAttribute("cx", p[0]);
  this.ring.setAttribute("cy", p[1]);
  if (p[0] < w.scrollLeft + 20 || p[0] > w.scrollLeft + w.clientWidth - 60) w.scrollLeft = Math.max(0, p[0] - w.clientWidth / 2);
  this.drawVisible();
  if (fromTree) {  // keep the text selection in step with the tree when the node is on the shown path
    if (this.current !== undefined) this.spans[this.current].setAttribute("aria-selected", "false");
    var on = this.path[step];
    if (on && on[1] === b) {
      this.current = step;
      this.spans[step].setAttribute("aria-selected", "true");
    }
  }
  this.renderNode(step, b);
};

Panel.prototype.renderNode = function (step, b) {
  var t = this.t, node = this.node(step, b), beam = this.beam;
  var onPath = this.path && this.path[step] && this.path[step][0] === step && this.path[step][1] === b;
  var chosen = onPath ? (step + 1 < this.path.length ? this.node(step + 1, this.path[step + 1][1])[1] : beam.hyps[this.shownHyp][2]) : -1;
  var rows = node[3].map(function (c) { return { token: c[0], probs: c.slice(6), c: c }; });
  var hypAt = {};
  beam.hyps.forEach(function (h) { if (h[0] === step && h[1] === b) hypAt[h[2]] = h; });
  var extra = [
    { title: "log p", width: 56, cell: function (r) { return '<td class="num">' + num(r.c[4]) + "</td>"; } },
    { title: "score", width: 56, cell: function (r) { return '<td class="num">' + num(r.c[5]) + "</td>"; } },
    { title: "outcome", width: 76, cell: function (r) {
      var st = STATUS[r.c[1]], text = "—", h = hypAt[r.c[0]];
      if (st === "kept") text = "→ beam " + (r.c[3] + 1);
      else if (st === "finished") text = h ? "✓ " + h[3].toFixed(2) : "ended, dropped";
      else if (r.c[2] >= 0) text = "pruned";
      var tip = r.c[2] >= 0 ? "#" + (r.c[2] + 1) + " of all beams' continuations" : "not among the " + beam.k + " best";
      if (h) tip += "; hypothesis score " + h[3].toFixed(4) + " = score / length^length_penalty";
      return '<td class="st-' + st + '" title="' + esc(tip) + '">' + esc(text) + "</td>";
    } },
  ];
  var head = "Step " + (step + 1) + ", beam " + (b + 1) + (step > 0 ? " (ends in <b>" + esc(shown(tokText(node[1]))) + "</b>)" : " (the prompt)") +
    ", score " + num(node[2]) + ". Of all beams' continuations, the " + beam.nb + " best that go on become the next beams (→); " +
    "those among the " + beam.nb + " best that end (EOS or length) become hypotheses (✓).";
  this.detail.innerHTML = '<p class="head">' + head + "</p>" +
    candidateTable(t.stages, rows, Math.min(t.top, rows.length), node[4], node[5], chosen, extra, t.params);
};

