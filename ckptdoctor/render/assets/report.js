// ckptdoctor report: draws the embedded JSON. Every string from the checkpoint reaches the DOM
// through textContent or a data-* attribute, never as markup (keys come from untrusted files).
(function () {
  "use strict";

  var d3 = window.d3;
  var data = JSON.parse(document.getElementById("ckptdoctor-data").textContent);
  var view = JSON.parse(document.getElementById("ckptdoctor-view").textContent);
  var mode = view.mode;
  var MAX_CELLS = 1500;   // draw levels of the tree until one more would pass this many blocks
  var TABLE_ROWS = 500;   // rows the table shows at once; the search box narrows the rest

  // ------------------------------------------------------------ small helpers

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function humanBytes(n) {  // as the terminal prints it (ckptdoctor.engines.inspection.overview.human_bytes)
    var units = ["B", "KB", "MB", "GB", "TB"];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(n) < 1000 || i === units.length - 1) return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
      n /= 1000;
    }
    return n.toFixed(1) + " TB";
  }

  function count(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(1) + "B";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + "K";
    return String(n);
  }

  function shown(name) { return name === "" ? "\"\"" : name; }  // a key like "a..b" has an empty segment

  function shapeText(shape) { return "[" + shape.join(", ") + "]"; }
  function grouped(n) { return Number(n).toLocaleString("en-US"); }

  function formatIndices(indices) {  // (0, 1, 2, 5, 7, 8) -> "0..2,5,7..8", as engines/inspection/tree.py
    var parts = [], start = indices[0], prev = indices[0];
    for (var i = 1; i <= indices.length; i++) {
      var cur = i < indices.length ? indices[i] : null;
      if (cur !== null && cur === prev + 1) { prev = cur; continue; }
      parts.push(start === prev ? String(start) : start + ".." + prev);
      if (cur !== null) { start = cur; prev = cur; }
    }
    return parts.join(",");
  }

  function hexToRgb(hex) {
    var v = parseInt(hex.slice(1), 16);
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  }

  function mix(hex, amount) {  // blend toward white: amount 0 = colour, 1 = white
    var c = hexToRgb(hex).map(function (x) { return Math.round(x + (255 - x) * amount); });
    return "rgb(" + c[0] + ", " + c[1] + ", " + c[2] + ")";
  }

  function isLight(hex) {
    var c = hexToRgb(hex);
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 170;
  }

  // ------------------------------------------------------------ colours

  var DTYPE_COLOURS = {
    float32: "#4e79a7", float64: "#2f4b7c", bfloat16: "#59a14f", float16: "#8cd17d",
    float8_e4m3fn: "#b6992d", float8_e5m2: "#d4a72c", float8_e4m3fnuz: "#c49a2a", float8_e5m2fnuz: "#e0b84a",
    float8_e8m0fnu: "#a88a22", float4_e2m1fn_x2: "#8f7a1e", complex32: "#d4a6c8", complex64: "#b07aa1",
    complex128: "#8e5b83", int64: "#f28e2b", int32: "#ffbe7d", int16: "#e15759", int8: "#ff9d9a",
    uint8: "#9c755f", uint16: "#c4a484", uint32: "#d7b5a6", uint64: "#a0522d", bool: "#bab0ac",
    qint8: "#76b7b2", quint8: "#499894", qint32: "#86bcb6"
  };
  var SPARE = ["#79706e", "#d37295", "#fabfd2", "#b6992d", "#499894", "#86bcb6", "#e15759", "#f1ce63"];
  function dtypeColour(dtype) {
    if (DTYPE_COLOURS[dtype]) return DTYPE_COLOURS[dtype];
    var h = 0;
    for (var i = 0; i < dtype.length; i++) h = (h * 31 + dtype.charCodeAt(i)) >>> 0;
    return SPARE[h % SPARE.length];
  }

  // Overlay categories, most important first: a key in several lists takes the first.
  var STATUSES = {
    check: [
      { id: "shape", label: "shape mismatch", colour: "#d62728" },
      { id: "harmless", label: "known-harmless", colour: "#9aa5b1" },
      { id: "missing", label: "missing (model key, not in the file)", colour: "#ff7f0e" },
      { id: "unexpected", label: "unexpected", colour: "#9467bd" },
      { id: "renamed", label: "renamed old → new", colour: "#1f77b4" }
    ],
    diff: [
      { id: "only-a", label: "only in A", colour: "#d62728" },
      { id: "only-b", label: "only in B", colour: "#2ca02c" },
      { id: "shape", label: "shape changed", colour: "#ff7f0e" },
      { id: "dtype", label: "dtype changed", colour: "#9467bd" },
      { id: "value", label: "values changed", colour: "#e377c2" },
      { id: "renamed", label: "renamed (paired A → B)", colour: "#1f77b4" }
    ]
  };
  var OK_COLOUR = "#cfd5dc";
  var statusList = STATUSES[mode] || [];
  var statusInfo = {};
  statusList.forEach(function (s, i) { s.rank = i; statusInfo[s.id] = s; });
  statusInfo.ok = { id: "ok", label: mode === "diff" ? "unchanged" : "loads as is", colour: OK_COLOUR, rank: 99 };

  // ------------------------------------------------------------ rows: one per tensor, ghosts included

  function fromRecord(t) {
    return { key: t.key, shape: t.shape, dtype: t.dtype, nbytes: t.nbytes, numel: t.numel, ghost: false };
  }
  function fromCompact(r, ghost) {
    return { key: r[0], shape: r[1], dtype: r[2], nbytes: r[3], numel: r[4], ghost: ghost };
  }

  var source = mode === "inspect" ? data : view.source;
  var rows = mode === "inspect" ? data.tensors.map(fromRecord)
    : view.source.rows.map(function (r) { return fromCompact(r, false); })
      .concat((view.ghosts || []).map(function (r) { return fromCompact(r, true); }));

  // status and a one-line detail per key, from the embedded document's own lists
  var fileStatus = new Map(), ghostStatus = new Map();
  function mark(map, key, status, detail) {
    var had = map.get(key);
    if (had && statusInfo[had.status].rank <= statusInfo[status].rank) return;
    map.set(key, { status: status, detail: detail || "" });
  }

  if (mode === "check") {
    var after = data.after_repair || {};
    var harmless = { missing: [], unexpected: [] };
    (data.findings || []).forEach(function (f) {
      if (f.code === "harmless-missing" && f.evidence) {
        harmless.missing = harmless.missing.concat(f.evidence.missing || []);
        harmless.unexpected = harmless.unexpected.concat(f.evidence.unexpected || []);
      }
    });
    (after.shape_mismatches || []).forEach(function (m) {
      mark(fileStatus, m.key, "shape", "checkpoint " + shapeText(m.checkpoint_shape) + " vs model " +
        shapeText(m.model_shape) + (m.model_key && m.model_key !== m.key ? " (model key " + m.model_key + ")" : ""));
    });
    harmless.unexpected.forEach(function (k) { mark(fileStatus, k, "harmless", "unexpected, known-harmless"); });
    harmless.missing.forEach(function (k) { mark(ghostStatus, k, "harmless", "missing, known-harmless"); });
    (after.missing_keys || []).forEach(function (k) { mark(ghostStatus, k, "missing", "the model expects it; the file lacks it"); });
    (after.unexpected_keys || []).forEach(function (k) { mark(fileStatus, k, "unexpected", "the model has no place for it"); });
    (after.renamed || []).forEach(function (r) { mark(fileStatus, r.key, "renamed", r.key + " → " + r.model_key); });
  } else if (mode === "diff") {
    (data.only_in_a || []).forEach(function (k) { mark(fileStatus, k, "only-a", "B has no such key"); });
    (data.only_in_b || []).forEach(function (k) { mark(ghostStatus, k, "only-b", "A has no such key"); });
    (data.shape_changed || []).forEach(function (c) {
      mark(fileStatus, c.key, "shape", "A " + shapeText(c.shape_a) + " → B " + shapeText(c.shape_b) +
        (c.key_b !== c.key ? " (B: " + c.key_b + ")" : ""));
    });
    (data.dtype_changed || []).forEach(function (c) {
      mark(fileStatus, c.key, "dtype", "A " + c.dtype_a + " → B " + c.dtype_b + (c.key_b !== c.key ? " (B: " + c.key_b + ")" : ""));
    });
    (data.value_changed || []).forEach(function (c) {
      var diff = c.max_abs_diff === null ? "not numerically comparable" : "max |a − b| = " + c.max_abs_diff.toPrecision(6);
      mark(fileStatus, c.key, "value", grouped(c.differing_elements) + " of " + grouped(c.numel) + " elements differ, " + diff);
    });
    (data.renamed || []).forEach(function (r) { mark(fileStatus, r.key_a, "renamed", "in B as " + r.key_b); });
  }

  // value changes are shaded by the size of the change (log scale between the smallest and largest)
  var shadeOf = new Map();
  if (mode === "diff") {
    var diffs = (data.value_changed || []).filter(function (c) { return c.max_abs_diff !== null && c.max_abs_diff > 0; })
      .map(function (c) { return Math.log10(c.max_abs_diff); });
    var lo = Math.min.apply(null, diffs.concat([0])), hi = Math.max.apply(null, diffs.concat([0]));
    (data.value_changed || []).forEach(function (c) {
      var s = 1;
      if (c.max_abs_diff !== null && c.max_abs_diff > 0 && hi > lo) s = (Math.log10(c.max_abs_diff) - lo) / (hi - lo);
      shadeOf.set(c.key, s);
    });
  }

  rows.forEach(function (r, i) {
    r.index = i;
    var s = (r.ghost ? ghostStatus : fileStatus).get(r.key);
    r.status = s ? s.status : "ok";
    r.detail = s ? s.detail : "";
    r.shade = r.status === "value" ? shadeOf.get(r.key) : 1;
  });

  // ------------------------------------------------------------ the key tree (folded like `inspect`)

  function TNode(name, path) { this.name = name; this.path = path; this.children = new Map(); this.row = null; }

  var trie = new TNode("", "");
  rows.forEach(function (row) {
    var parts = row.key.split("."), node = trie;
    for (var i = 0; i < parts.length; i++) {
      var child = node.children.get(parts[i]);
      if (!child) {
        child = new TNode(parts[i], node === trie ? parts[i] : node.path + "." + parts[i]);
        node.children.set(parts[i], child);
      }
      if (i === parts.length - 1 && child.row) {  // the same key from the other side (a ghost): a sibling
        var alt = parts[i] + (row.ghost ? " (missing)" : " (file)");
        child = new TNode(alt, child.path + " ");
        node.children.set(alt + "\u0000" + row.index, child);
      }
      node = child;
    }
    node.row = row;
  });

  function worse(a, b) { return statusInfo[a].rank <= statusInfo[b].rank ? a : b; }

  // totals per node: bytes, parameters, tensors, bytes per dtype, the most important status
  (function total(node) {
    node.bytes = 0; node.params = 0; node.tensors = 0; node.dtypes = new Map(); node.status = "ok"; node.ghost = true;
    if (node.row) {
      node.bytes = node.row.nbytes; node.params = node.row.numel; node.tensors = 1;
      node.dtypes.set(node.row.dtype, node.row.nbytes); node.status = node.row.status; node.ghost = node.row.ghost;
    }
    node.children.forEach(function (child) {
      total(child);
      node.bytes += child.bytes; node.params += child.params; node.tensors += child.tensors;
      child.dtypes.forEach(function (b, d) { node.dtypes.set(d, (node.dtypes.get(d) || 0) + b); });
      node.status = worse(node.status, child.status);
      node.ghost = node.ghost && child.ghost;
    });
  })(trie);

  function dominantDtype(dtypes) {
    var best = null, most = -1;
    dtypes.forEach(function (b, d) { if (b > most) { most = b; best = d; } });
    return best || "";
  }

  // (relative key, shape, dtype, status) of every tensor below: equal signatures fold
  function signature(node) {
    if (node.sig !== undefined) return node.sig;
    var out = [], stack = [["", node]];
    while (stack.length) {
      var item = stack.pop(), path = item[0], cur = item[1];
      if (cur.row) out.push(path + "\u0000" + cur.row.shape.join(",") + "\u0000" + cur.row.dtype + "\u0000" +
        cur.row.status + "\u0000" + cur.row.ghost);
      cur.children.forEach(function (sub, name) { stack.push([path ? path + "." + name : name, sub]); });
    }
    out.sort();
    node.sig = out.join("\u0001");
    return node.sig;
  }

  var unfolded = new Set();
  var DIGITS = /^[0-9]+$/;

  // A display node: a module, a tensor, or a folded group of identical numbered siblings.
  function moduleOrTensor(t, namePath, parent) {
    var d = { id: namePath, name: t.name, tnode: t, parent: parent, bytes: t.bytes, params: t.params, tensors: t.tensors,
      status: t.status, ghost: t.ghost, dtype: dominantDtype(t.dtypes), repeat: 1 };
    d.kind = t.children.size ? "module" : "tensor";
    if (d.kind === "tensor") d.row = t.row;
    return d;
  }

  function displayChildren(d) {
    var t = d.tnode, out = [], groups = [], bySig = new Map();
    if (t.row && t.children.size) {  // a key that is also a module prefix: its own tensor as a block
      out.push({ id: d.id + "\u0000self", name: t.name, kind: "tensor", row: t.row, tnode: t, parent: d, bytes: t.row.nbytes,
        params: t.row.numel, tensors: 1, status: t.row.status, ghost: t.row.ghost, dtype: t.row.dtype, repeat: 1 });
    }
    t.children.forEach(function (child, name) {
      if (DIGITS.test(name) && child.children.size) {
        var sig = signature(child);
        if (bySig.has(sig)) { groups[bySig.get(sig)].push(child); return; }
        bySig.set(sig, groups.length);
      }
      groups.push([child]);
    });
    var base = d.id === "" ? "" : d.id + ".";
    groups.forEach(function (members) {
      if (members.length === 1) { out.push(moduleOrTensor(members[0], base + members[0].name, d)); return; }
      // sorted as numbers, as engines/inspection/tree.py does (text-ordered shards list 10 before 9)
      var indices = members.map(function (m) { return parseInt(m.name, 10); }).sort(function (x, y) { return x - y; });
      var name = "{" + formatIndices(indices) + "}";
      var id = base + name;
      if (unfolded.has(id)) {
        members.forEach(function (m) { out.push(moduleOrTensor(m, base + m.name, d)); });
        return;
      }
      var first = members[0], n = members.length;
      out.push({ id: id, name: name, kind: "group", members: members, tnode: first, parent: d, repeat: n,
        bytes: first.bytes * n, params: first.params * n, tensors: first.tensors * n, status: first.status,
        ghost: first.ghost, dtype: dominantDtype(first.dtypes) });
    });
    return out;
  }

  var rootDisplay = { id: "", name: "state dict", kind: "module", tnode: trie, parent: null, bytes: trie.bytes,
    params: trie.params, tensors: trie.tensors, status: trie.status, ghost: false, dtype: dominantDtype(trie.dtypes), repeat: 1 };
  var zoom = [rootDisplay];

  // ------------------------------------------------------------ the treemap

  var treemapEl = document.getElementById("treemap");
  var colourSelect = document.getElementById("colour-mode");
  // findings or changes first; a clean check or an identical diff shows its dtypes
  var colourBy = rows.some(function (r) { return r.status !== "ok"; }) ? "status" : "dtype";
  var drawn = [];

  function fillOf(d) {
    if (colourBy === "dtype") return { hex: dtypeColour(d.dtype), css: dtypeColour(d.dtype) };
    var info = statusInfo[d.status] || statusInfo.ok;
    if (d.status === "value" && d.row) return { hex: info.colour, css: mix(info.colour, 0.65 * (1 - d.row.shade)) };
    return { hex: info.colour, css: info.colour };
  }

  function render() {
    var root = zoom[zoom.length - 1];
    // choose how many levels to draw: as many as fit in MAX_CELLS blocks (at least one)
    var level = [root], cellCount = 0;
    root.drawKids = null;
    while (true) {
      var next = [], kidsOf = [];
      for (var i = 0; i < level.length; i++) {
        if (level[i].kind !== "module") continue;
        var kids = displayChildren(level[i]);
        kidsOf.push([level[i], kids]);
        for (var k = 0; k < kids.length; k++) next.push(kids[k]);
      }
      if (!next.length || (cellCount > 0 && cellCount + next.length > MAX_CELLS)) break;
      kidsOf.forEach(function (pair) { pair[0].drawKids = pair[1]; });
      next.forEach(function (d) { d.drawKids = null; });
      cellCount += next.length;
      level = next;
    }
    var width = treemapEl.clientWidth, height = treemapEl.clientHeight;
    var h = d3.hierarchy(root, function (d) { return d.drawKids; })
      .sum(function (d) { return d.drawKids ? 0 : d.bytes; })
      .sort(function (a, b) { return b.value - a.value; });
    d3.treemap().size([width, height]).tile(d3.treemapSquarify).paddingInner(1).paddingOuter(2)
      .paddingTop(function (n) {
        if (n.depth === 0) return 2;
        return n.y1 - n.y0 > 36 && n.x1 - n.x0 > 44 ? 16 : 2;
      })(h);

    var frag = document.createDocumentFragment();
    drawn = [];
    h.descendants().forEach(function (n) {
      if (n.depth === 0 || !(n.value > 0)) return;  // an empty tensor has no area: it is in the table only
      var d = n.data, cell = el("div", "cell " + d.kind);
      var collapsed = d.kind === "module" && !n.children;
      if (collapsed) cell.classList.add("collapsed");
      if (d.ghost) cell.classList.add("ghost");
      cell.dataset.idx = String(drawn.length);
      cell.dataset.path = d.id;
      cell.dataset.kind = d.kind;
      cell.dataset.status = d.status;
      if (d.kind === "tensor") cell.dataset.key = d.row.key;
      if (d.kind === "group") cell.dataset.repeat = String(d.repeat);
      cell.style.left = n.x0 + "px";
      cell.style.top = n.y0 + "px";
      cell.style.width = Math.max(0, n.x1 - n.x0) + "px";
      cell.style.height = Math.max(0, n.y1 - n.y0) + "px";
      if (d.kind !== "module" || collapsed) {
        var fill = fillOf(d);
        cell.style.backgroundColor = fill.css;
        if (isLight(fill.hex)) cell.classList.add("light");
      }
      var w = n.x1 - n.x0, hgt = n.y1 - n.y0;
      if (w > 36 && hgt > 13) {
        var text = d.kind === "group" ? d.name + " ×" + d.repeat : shown(d.name);
        if (w > 110) text += "  " + humanBytes(d.bytes);
        cell.appendChild(el("span", "label", text));
      }
      drawn.push(d);
      frag.appendChild(cell);
    });
    treemapEl.replaceChildren(frag);
    if (!rows.length) treemapEl.appendChild(el("p", "hint", "The state dict holds no tensors."));
    renderCrumbs();
  }

  function renderCrumbs() {
    var nav = document.getElementById("crumbs");
    nav.replaceChildren();
    zoom.forEach(function (d, i) {
      if (i > 0) nav.appendChild(el("span", "sep", "›"));
      var b = el("button", null, i === 0 ? "state dict" : shown(d.name));
      b.type = "button";
      b.dataset.depth = String(i);
      if (i === zoom.length - 1) b.setAttribute("aria-current", "page");
      b.addEventListener("click", function () { if (zoom.length > i + 1) { zoom.length = i + 1; render(); } });
      nav.appendChild(b);
    });
    var root = zoom[zoom.length - 1];
    nav.appendChild(el("span", "sep", "  " + humanBytes(root.bytes) + ", " + grouped(root.tensors) + " tensors"));
  }

  treemapEl.addEventListener("click", function (ev) {
    var cell = ev.target.closest(".cell");
    if (!cell) return;
    var d = drawn[Number(cell.dataset.idx)];
    if (d.kind === "group") { unfolded.add(d.id); render(); return; }
    var root = zoom[zoom.length - 1], top = d;
    while (top.parent && top.parent !== root) top = top.parent;
    if (top.kind === "module") { zoom.push(top); render(); hideTip(); return; }
    if (top.kind === "tensor") { search.value = top.row.key; renderTable(); }
  });

  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape" && zoom.length > 1 && document.activeElement !== search) { zoom.pop(); render(); }
  });

  // ------------------------------------------------------------ tooltip

  var tip = document.getElementById("tooltip");
  function hideTip() { tip.hidden = true; }
  function tipLines(d) {
    var lines = [];
    if (d.kind === "tensor") {
      var r = d.row;
      lines.push(["key", r.key + (r.ghost ? "  (not in the file)" : "")]);
      lines.push(["shape", shapeText(r.shape) + "  " + r.dtype]);
      lines.push(["size", humanBytes(r.nbytes) + ", " + grouped(r.numel) + " parameters"]);
    } else {
      var path = d.kind === "group" ? (d.parent && d.parent.id ? d.parent.id + "." : "") + d.name : d.id;
      lines.push(["module", path || "state dict"]);
      if (d.kind === "group") {
        lines.push(["repeat", "×" + d.repeat + " identical blocks, " + humanBytes(d.bytes / d.repeat) + " each (click to unfold)"]);
      }
      lines.push(["size", humanBytes(d.bytes) + ", " + grouped(d.params) + " parameters, " + grouped(d.tensors) + " tensors"]);
      lines.push(["dtype", d.dtype + (d.tnode.dtypes.size > 1 ? " (mostly)" : "")]);
    }
    if (mode !== "inspect") {
      var info = statusInfo[d.status] || statusInfo.ok;
      lines.push(["status", info.label + (d.kind === "tensor" && d.row.detail ? ": " + d.row.detail : "")]);
    }
    return lines;
  }
  treemapEl.addEventListener("mousemove", function (ev) {
    var cell = ev.target.closest(".cell");
    if (!cell) { hideTip(); return; }
    var d = drawn[Number(cell.dataset.idx)];
    tip.replaceChildren();
    tipLines(d).forEach(function (pair, i) {
      var line = el("div", i === 0 ? "tip-title" : "tip-line");
      line.textContent = i === 0 ? pair[1] : pair[0] + ": " + pair[1];
      tip.appendChild(line);
    });
    tip.hidden = false;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth - 4) x = Math.max(4, ev.clientX - tip.offsetWidth - 14);
    if (y + tip.offsetHeight > window.innerHeight - 4) y = Math.max(4, ev.clientY - tip.offsetHeight - 14);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  });
  treemapEl.addEventListener("mouseleave", hideTip);

  // ------------------------------------------------------------ legend and colour mode

  function renderLegend() {
    var legend = document.getElementById("legend");
    legend.replaceChildren();
    function item(colour, text, status, ghost, dtype) {
      var span = el("span", "legend-item");
      if (status) span.dataset.status = status;
      if (dtype) span.dataset.dtype = dtype;
      var sw = el("span", "swatch" + (ghost ? " ghost" : ""));
      sw.style.backgroundColor = colour;
      span.appendChild(sw);
      span.appendChild(document.createTextNode(text));
      legend.appendChild(span);
    }
    if (colourBy === "dtype") {
      var byDtype = new Map();
      rows.forEach(function (r) { byDtype.set(r.dtype, (byDtype.get(r.dtype) || 0) + r.nbytes); });
      Array.from(byDtype.entries()).sort(function (a, b) { return b[1] - a[1]; }).forEach(function (e) {
        item(dtypeColour(e[0]), e[0] + " " + humanBytes(e[1]), null, false, e[0]);
      });
    } else {
      var counts = new Map();
      rows.forEach(function (r) { counts.set(r.status, (counts.get(r.status) || 0) + 1); });
      statusList.concat([statusInfo.ok]).forEach(function (s) {
        var n = counts.get(s.id) || 0;
        if (n || s.id === "ok") item(s.colour, s.label + " (" + grouped(n) + ")", s.id,
          s.id === "missing" || s.id === "only-b");
      });
    }
    if (rows.some(function (r) { return r.ghost; })) {
      var note = el("span", "legend-item", mode === "diff" ? "dashed: B's tensor, drawn where A would have it"
        : "dashed: a tensor the model expects, drawn where the file would have it");
      legend.appendChild(note);
    }
  }

  if (mode !== "inspect") {
    document.getElementById("colour-by").hidden = false;
    [["status", mode === "diff" ? "changes" : "findings"], ["dtype", "dtype"]].forEach(function (o) {
      var opt = el("option", null, o[1]);
      opt.value = o[0];
      colourSelect.appendChild(opt);
    });
    colourSelect.value = colourBy;
    colourSelect.addEventListener("change", function () { colourBy = colourSelect.value; renderLegend(); render(); });
  }

  // ------------------------------------------------------------ header

  function facts(title, src, extra) {
    var box = el("div", "facts-box");
    if (title) box.appendChild(el("p", "facts-title", title));
    var dl = el("dl", "facts");
    function add(name, value) {
      if (value === null || value === undefined || value === "") return;
      dl.appendChild(el("dt", null, name));
      dl.appendChild(el("dd", null, value));
    }
    add("File", src.path);
    add("Format", src.format + "  (" + humanBytes(src.file_size) + " on disk)");
    add("State dict", src.state_dict_path && src.state_dict_path.length ? src.state_dict_path.join("/") : "(the file's root)");
    var distinct = src.storage_bytes !== src.total_bytes ? "; " + humanBytes(src.storage_bytes) + " of distinct storage" : "";
    add("Tensors", grouped(src.tensor_count) + "  (" + grouped(src.parameters) + " elements, " + humanBytes(src.total_bytes) + distinct + ")");
    add("Dtypes", Object.keys(src.bytes_by_dtype || {}).map(function (k) { return k + " " + humanBytes(src.bytes_by_dtype[k]); }).join(", ") || "-");
    add("Devices", (src.devices || []).join(", ") || "-");
    if (src.shared_storages && src.shared_storages.length) add("Shared", src.shared_storages.length + " storages shared by several keys");
    (src.entries || []).forEach(function (e) { add(e.name, e.summary); });
    (src.notes || []).forEach(function (n) { add("Note", n); });
    (extra || []).forEach(function (pair) { add(pair[0], pair[1]); });
    box.appendChild(dl);
    return box;
  }

  function renderHeader() {
    var factsEl = document.getElementById("facts"), verdict = document.getElementById("verdict");
    var title = document.getElementById("title");
    if (mode === "inspect") {
      title.textContent = "inspect " + data.path;
      factsEl.appendChild(facts(null, data));
    } else if (mode === "check") {
      title.textContent = "check " + data.path + " --against " + data.spec;
      var asIs = data.missing_keys.length + " missing, " + data.unexpected_keys.length + " unexpected, " +
        data.shape_mismatches.length + " shape mismatches";
      if (data.ok) {
        verdict.textContent = "✓ loads as is into " + data.spec + " (strict=True)";
        verdict.className = "good";
      } else {
        var errors = data.findings.filter(function (f) { return f.severity === "error"; }).length || 1;
        verdict.textContent = "✗ " + errors + " problem" + (errors === 1 ? "" : "s") + ": does not load strictly into " +
          data.spec + " (as it is: " + asIs + ")";
        verdict.className = "bad";
      }
      factsEl.appendChild(facts(null, view.source, [["Spec", data.spec + " (" + data.spec_kind + ")"]]));
      if (data.findings.length) renderFindings(data.findings.map(function (f) { return [f.severity, f.code, f.message]; }));
      var fix = document.getElementById("fix");
      if (data.ok) {
        fix.hidden = true;
      } else if (view.fix_command) {
        renderFindings([]);
        fix.hidden = false;
        document.getElementById("fix-command").textContent = view.fix_command;
      } else {
        renderFindings([]);
        fix.hidden = false;
        document.getElementById("copy-fix").hidden = true;
        document.getElementById("fix-command").textContent = "no key-by-key repair can make this load; see the findings";
      }
    } else {
      title.textContent = "diff " + view.source.path + " " + view.b.path;
      var what = data.values_compared ? "keys, shapes, dtypes and values" : "keys, shapes and dtypes";
      verdict.textContent = (data.identical ? "✓ identical" : "✗ different") + " (" + what + ")";
      verdict.className = data.identical ? "good" : "bad";
      factsEl.appendChild(facts("A", view.source));
      factsEl.appendChild(facts("B", view.b));
      var lines = (data.explanations || []).map(function (e) { return ["info", "", e]; });
      var counts = [["only in A", data.only_in_a.length], ["only in B", data.only_in_b.length],
        ["shape changed", data.shape_changed.length], ["dtype changed", data.dtype_changed.length],
        ["values changed", data.value_changed.length]];
      lines.push(["", "", counts.map(function (c) { return c[0] + ": " + c[1]; }).join(" · ")]);
      renderFindings(lines);
    }
    document.title = "ckptdoctor " + title.textContent;
  }

  function renderFindings(items) {
    document.getElementById("overlay").hidden = false;
    var list = document.getElementById("findings");
    items.forEach(function (it) {
      var li = el("li");
      if (it[0]) li.appendChild(el("span", "sev sev-" + it[0], it[0]));
      if (it[1]) li.appendChild(el("span", "code", it[1]));
      appendWithCode(li, it[2]);
      list.appendChild(li);
    });
  }

  function appendWithCode(parent, text) {  // `code` spans of the engines' messages, as text nodes
    String(text).split("`").forEach(function (part, i) {
      if (part) parent.appendChild(i % 2 ? el("code", null, part) : document.createTextNode(part));
    });
  }

  var copyButton = document.getElementById("copy-fix");
  copyButton.addEventListener("click", function () {
    var text = view.fix_command || "", status = document.getElementById("copy-status");
    function fallback() {
      var range = document.createRange(), sel = window.getSelection(), ok = false;
      range.selectNodeContents(document.getElementById("fix-command"));
      sel.removeAllRanges();
      sel.addRange(range);
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      status.textContent = ok ? "copied" : "selected: press Ctrl+C";
    }
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(function () { status.textContent = "copied"; }, fallback);
    } else {
      fallback();
    }
  });

  // ------------------------------------------------------------ the table

  var search = document.getElementById("search");
  var sortBy = { col: "nbytes", dir: -1 };
  var columns = [["key", "key"], ["shape", "shape"], ["dtype", "dtype"], ["nbytes", "bytes"], ["numel", "params"]];
  if (mode !== "inspect") columns.push(["status", mode === "diff" ? "change" : "finding"]);
  var sorted = rows.slice();

  function sortRows() {
    var col = sortBy.col, dir = sortBy.dir;
    sorted.sort(function (a, b) {
      var x = a[col], y = b[col];
      if (col === "shape") { x = a.numel; y = b.numel; }
      if (col === "status") { x = statusInfo[a.status].rank; y = statusInfo[b.status].rank; }
      if (x < y) return -dir;
      if (x > y) return dir;
      return a.index - b.index;
    });
  }

  function renderHead() {
    var head = document.getElementById("table-head");
    head.replaceChildren();
    columns.forEach(function (c) {
      var th = el("th", null, c[1]);
      th.dataset.col = c[0];
      th.setAttribute("aria-sort", sortBy.col === c[0] ? (sortBy.dir > 0 ? "ascending" : "descending") : "none");
      th.addEventListener("click", function () {
        if (sortBy.col === c[0]) sortBy.dir = -sortBy.dir;
        else sortBy = { col: c[0], dir: c[0] === "key" || c[0] === "dtype" ? 1 : -1 };
        sortRows(); renderHead(); renderTable();
      });
      head.appendChild(th);
    });
  }

  function renderTable() {
    var q = search.value.trim().toLowerCase();
    var matching = q ? sorted.filter(function (r) { return r.key.toLowerCase().indexOf(q) >= 0; }) : sorted;
    var body = document.getElementById("table-body"), frag = document.createDocumentFragment();
    matching.slice(0, TABLE_ROWS).forEach(function (r) {
      var tr = el("tr", r.ghost ? "ghost" : null);
      tr.dataset.key = r.key;
      tr.dataset.status = r.status;
      if (r.ghost) tr.dataset.ghost = "1";
      tr.appendChild(el("td", "key", r.key));
      tr.appendChild(el("td", "shape", shapeText(r.shape)));
      tr.appendChild(el("td", null, r.dtype));
      tr.appendChild(el("td", "num", humanBytes(r.nbytes)));
      tr.appendChild(el("td", "num", grouped(r.numel)));
      if (mode !== "inspect") {
        var td = el("td");
        var info = statusInfo[r.status];
        var chip = el("span", "chip" + (isLight(info.colour) ? " light" : ""), info.label);
        chip.style.backgroundColor = info.colour;
        td.appendChild(chip);
        if (r.detail) td.appendChild(document.createTextNode(" " + r.detail));
        tr.appendChild(td);
      }
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
    var shown = Math.min(matching.length, TABLE_ROWS);
    document.getElementById("table-count").textContent = (q ? grouped(matching.length) + " of " + grouped(rows.length) +
      " tensors match" : grouped(rows.length) + " tensors") + (shown < matching.length ? "; showing the first " + shown : "");
  }

  var pending = 0;
  search.addEventListener("input", function () {
    if (pending) cancelAnimationFrame(pending);
    pending = requestAnimationFrame(function () { pending = 0; renderTable(); });
  });

  var resizeTimer = 0;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(render, 150);
  });

  // ------------------------------------------------------------ go

  renderHeader();
  renderLegend();
  render();
  sortRows();
  renderHead();
  renderTable();
  requestAnimationFrame(function () {
    document.body.dataset.paintMs = String(Math.round(performance.now()));
    document.body.dataset.ready = "1";
  });
})();
