
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("feature-data").textContent);
  var rows = data.features;
  var PAGE = 100;
  rows.forEach(function (r) {
    r._h = (r.index + " " + r.max_act_tokens.join(" ") + " " + r.pos_str.join(" ") + " " + r.neg_str.join(" "))
      .toLowerCase();
  });
  var keys = {index: "index", density: "frac_nonzero", max: "max_act", mean: "mean_act"};
  var state = {q: "", sort: "index", dir: 1, page: 0};
  (location.hash || "").replace(/^#/, "").split("&").forEach(function (kv) {
    var p = kv.split("="), k = decodeURIComponent(p[0] || ""), v = decodeURIComponent((p[1] || "").replace(/\+/g, " "));
    if (k === "q") state.q = v;
    var key = v.replace(/^-/, "");
    if (k === "sort" && keys[key]) { state.sort = key; state.dir = v[0] === "-" ? -1 : 1; }
    if (k === "page") state.page = Math.max(0, (parseInt(v, 10) || 1) - 1);
  });
  var q = document.getElementById("q"), body = document.querySelector("#features tbody");
  var info = document.getElementById("count");
  var prev = document.getElementById("prev"), next = document.getElementById("next");
  q.value = state.q;
  function chip(parent, text) {
    var s = document.createElement("span"); s.className = "tok"; s.textContent = text; parent.appendChild(s);
  }
  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text; tr.appendChild(td); return td;
  }
  function fmt(x) { return Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(3); }
  function render() {
    var needle = state.q.trim().toLowerCase();
    var list = needle ? rows.filter(function (r) { return r._h.indexOf(needle) >= 0; }) : rows.slice();
    var key = keys[state.sort], dir = state.dir;
    list.sort(function (a, b) { return (a[key] - b[key]) * dir || a.index - b.index; });
    var pages = Math.max(1, Math.ceil(list.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * PAGE, shown = list.slice(start, start + PAGE);
    var frag = document.createDocumentFragment();
    shown.forEach(function (r) {
      var tr = document.createElement("tr"); tr.setAttribute("data-feature", r.index);
      var td = document.createElement("td"), a = document.createElement("a");
      a.href = r.page; a.textContent = "#" + r.index; td.appendChild(a); tr.appendChild(td);
      cell(tr, (100 * r.frac_nonzero).toPrecision(3) + "%", "num density");
      cell(tr, fmt(r.max_act), "num max");
      cell(tr, fmt(r.mean_act), "num mean");
      var tt = cell(tr, "", "chips tokens"); r.max_act_tokens.slice(0, 5).forEach(function (t) { chip(tt, t); });
      var pl = cell(tr, "", "chips logits"); r.pos_str.slice(0, 5).forEach(function (t) { chip(pl, t); });
      frag.appendChild(tr);
    });
    body.textContent = ""; body.appendChild(frag);
    info.textContent = list.length ? ("Features " + (start + 1) + "\u2013" + (start + shown.length) + " of " +
      list.length + (needle ? " matching (" + rows.length + " total)" : "")) : "No feature matches.";
    prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
    document.querySelectorAll("#features th[data-sort]").forEach(function (th) {
      var on = th.getAttribute("data-sort") === state.sort;
      th.classList.toggle("sorted", on); th.classList.toggle("asc", on && state.dir > 0);
    });
    var h = "sort=" + (state.dir < 0 ? "-" : "") + state.sort + (state.q ? "&q=" + encodeURIComponent(state.q) : "") +
      (state.page ? "&page=" + (state.page + 1) : "");
    if (history.replaceState) { try { history.replaceState(null, "", "#" + h); } catch (e) { /* file:// */ } }
  }
  var timer = null;
  q.addEventListener("input", function () {
    clearTimeout(timer); timer = setTimeout(function () { state.q = q.value; state.page = 0; render(); }, 120);
  });
  document.querySelectorAll("#features th[data-sort]").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = th.getAttribute("data-sort");
      if (state.sort === k) state.dir = -state.dir; else { state.sort = k; state.dir = k === "index" ? 1 : -1; }
      state.page = 0; render();
    });
  });
  prev.addEventListener("click", function () { state.page -= 1; render(); });
  next.addEventListener("click", function () { state.page += 1; render(); });
  render();
})();
