// nnsae attribution-graph viewer: draws the graph embedded in <script id="graph-data"> as SVG.
// Rows are layers (token embeddings at the bottom, logits at the top), columns are prompt positions. Hovering a
// node shows its feature, activation, influence and top-activating examples; clicking one highlights its edges;
// `#node=<node_id>` in the URL selects a node on load. Text is always set with textContent, never parsed as HTML.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var nodes = data.nodes, links = data.links;
  var ROW = 64, NODE = 14, LEFT = 56, TOP = 20, MIN_COL = 64;

  function el(tag, attrs, parent) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function html(tag, text, parent, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(x) {
    if (x === null || x === undefined) return "–";
    var a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(3) : x.toPrecision(4);
  }

  // rows: embeddings (row 0), layers 0..n-1 (rows 1..n), logits (row n+1)
  var nRows = data.n_layers + 2, nPos = data.prompt_tokens.length;
  function rowOf(n) { return n.kind === "embedding" ? 0 : n.kind === "logit" ? nRows - 1 : n.layer + 1; }
  var cells = {};
  nodes.forEach(function (n, i) {
    var key = rowOf(n) + ":" + n.pos;
    (cells[key] = cells[key] || []).push(i);
  });
  var perPos = [];
  for (var p = 0; p < nPos; p++) perPos.push(1);
  Object.keys(cells).forEach(function (key) {
    var pos = +key.split(":")[1];
    perPos[pos] = Math.max(perPos[pos], cells[key].length);
  });
  var colX = [], x = LEFT;
  perPos.forEach(function (count) { colX.push(x); x += Math.max(MIN_COL, count * (NODE + 4) + 12); });
  var width = x + 20, height = TOP + nRows * ROW + 40;
  Object.keys(cells).forEach(function (key) {
    var parts = key.split(":"), row = +parts[0], pos = +parts[1];
    cells[key].forEach(function (i, j) {
      nodes[i].x = colX[pos] + 10 + j * (NODE + 4) + NODE / 2;
      nodes[i].y = TOP + (nRows - 1 - row) * ROW + ROW / 2;
    });
  });

  var svg = el("svg", {width: width, height: height, id: "graph"}, null);
  document.getElementById("canvas").appendChild(svg);
  for (var r = 0; r < nRows; r++) {
    var label = r === 0 ? "Emb" : r === nRows - 1 ? "Logit" : "L" + (r - 1);
    el("text", {x: 6, y: TOP + (nRows - 1 - r) * ROW + ROW / 2 + 4, "class": "row-label"}, svg).textContent = label;
  }
  data.prompt_tokens.forEach(function (tok, pos) {
    var t = el("text", {x: colX[pos] + 8, y: height - 14, "class": "tok"}, svg);
    t.textContent = JSON.stringify(tok).slice(1, -1);
  });

  var maxW = 0;
  links.forEach(function (l) { maxW = Math.max(maxW, Math.abs(l.w)); });
  var edgeLayer = el("g", {}, svg), nodeLayer = el("g", {}, svg);
  var edgeEls = links.map(function (l) {
    var s = nodes[l.s], t = nodes[l.t];
    var mid = (s.y + t.y) / 2;
    var e = el("path", {
      d: "M" + s.x + "," + s.y + " C" + s.x + "," + mid + " " + t.x + "," + mid + " " + t.x + "," + t.y,
      "class": "edge " + (l.w >= 0 ? "pos" : "neg"),
      "stroke-width": (0.4 + 3.6 * Math.abs(l.w) / (maxW || 1)).toFixed(2),
      "stroke-opacity": (0.25 + 0.6 * Math.abs(l.w) / (maxW || 1)).toFixed(2),
      "data-source": s.id, "data-target": t.id, "data-weight": l.w
    }, edgeLayer);
    return e;
  });
  var nodeEls = nodes.map(function (n, i) {
    var c = el("circle", {cx: n.x, cy: n.y, r: NODE / 2, "class": "node " + n.kind, "data-node": n.id},
               nodeLayer);
    c.addEventListener("mouseenter", function (ev) { showTooltip(n, ev); if (selected < 0) showDetails(i); });
    c.addEventListener("mousemove", function (ev) { moveTooltip(ev); });
    c.addEventListener("mouseleave", hideTooltip);
    c.addEventListener("click", function () { select(selected === i ? -1 : i); });
    return c;
  });

  var tooltip = document.getElementById("tooltip");
  function summary(n) {
    var lines = [n.label];
    if (n.kind === "feature") lines.push("feature " + n.feature + " · activation " + fmt(n.activation));
    if (n.kind === "logit") lines.push("probability " + fmt(n.probability));
    lines.push("influence " + fmt(n.influence));
    return lines.join("\n");
  }
  function showTooltip(n, ev) { tooltip.textContent = summary(n); tooltip.style.display = "block"; moveTooltip(ev); }
  function moveTooltip(ev) { tooltip.style.left = ev.clientX + 12 + "px"; tooltip.style.top = ev.clientY + 12 + "px"; }
  function hideTooltip() { tooltip.style.display = "none"; }

  var details = document.getElementById("details");
  function showDetails(i) {
    details.textContent = "";
    if (i < 0) { html("p", "Hover a node for its details; click it to highlight its edges.", details, "hint"); return; }
    var n = nodes[i];
    html("h2", n.label, details);
    var table = html("table", null, details);
    var rows = [["node", n.id], ["kind", n.kind], ["layer", n.kind === "feature" || n.kind === "error" ? n.layer : "–"],
                ["position", n.pos + " " + JSON.stringify(data.prompt_tokens[n.pos] || "")]];
    if (n.kind === "feature") rows.push(["feature", n.feature], ["activation", fmt(n.activation)]);
    if (n.kind === "logit") rows.push(["probability", fmt(n.probability)]);
    rows.push(["influence", fmt(n.influence)]);
    var inc = 0, out = 0;
    links.forEach(function (l) { if (l.t === i) inc++; if (l.s === i) out++; });
    rows.push(["edges in / out", inc + " / " + out]);
    rows.forEach(function (row) {
      var tr = html("tr", null, table);
      html("td", row[0], tr);
      html("td", String(row[1]), tr).className = "v-" + row[0].replace(/[^a-z]/g, "");
    });
    if (n.examples && n.examples.length) {
      html("h2", "Top-activating examples", details);
      n.examples.forEach(function (ex) {
        var div = html("div", null, details, "example");
        ex.tokens.forEach(function (tok, k) {
          var span = html("span", tok, div, k === ex.max ? "max" : "");
          var a = ex.acts[k] / (ex.acts[ex.max] || 1);
          if (a > 0.02) span.style.background = "rgba(234,88,12," + Math.min(0.85, a * 0.85).toFixed(3) + ")";
          span.title = fmt(ex.acts[k]);
        });
      });
    } else if (n.kind === "feature") {
      html("p", data.has_examples ? "No stored examples for this feature." :
                "No extraction given: pass extraction= to show top-activating examples.", details, "hint");
    }
  }

  var selected = -1;
  function select(i) {
    selected = i;
    nodeEls.forEach(function (c) { c.classList.remove("selected"); c.classList.remove("hl"); });
    edgeEls.forEach(function (e) { e.classList.remove("hl"); });
    svg.classList.toggle("focus", i >= 0);
    if (i >= 0) {
      nodeEls[i].classList.add("selected");
      links.forEach(function (l, k) {
        if (l.s === i || l.t === i) {
          edgeEls[k].classList.add("hl");
          nodeEls[l.s].classList.add("hl");
          nodeEls[l.t].classList.add("hl");
          edgeLayer.appendChild(edgeEls[k]);  // draw highlighted edges on top
        }
      });
    }
    showDetails(i);
    document.body.setAttribute("data-selected", i >= 0 ? nodes[i].id : "");
  }

  var wanted = /(?:^|[#&])node=([^&]*)/.exec(location.hash);
  var start = -1;
  if (wanted) {
    var id = decodeURIComponent(wanted[1]);
    nodes.forEach(function (n, i) { if (n.id === id) start = i; });
  }
  select(start);
  document.body.setAttribute("data-rendered-nodes", String(nodeEls.length));
  document.body.setAttribute("data-rendered-edges", String(edgeEls.length));
  document.title = data.title + " (" + nodeEls.length + " nodes, " + edgeEls.length + " edges)";
})();
