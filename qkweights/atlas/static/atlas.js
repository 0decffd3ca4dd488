/* qkweights atlas: sorting, filtering, statistic switching, lazy images, keyboard navigation.
   A classic script (no modules, no fetch): every page works without it. */
(function () {
  "use strict";
  document.documentElement.classList.remove("nojs");

  // Lazy images: load when near the viewport (loading="lazy" is ignored on file://).
  var lazy = Array.prototype.slice.call(document.querySelectorAll("img.lazy[data-src]"));
  function show(img) { img.src = img.getAttribute("data-src"); img.removeAttribute("data-src"); img.classList.remove("lazy"); }
  if ("IntersectionObserver" in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { io.unobserve(e.target); show(e.target); } });
    }, { rootMargin: "400px 0px" });
    lazy.forEach(function (img) { io.observe(img); });
  } else { lazy.forEach(show); }

  // The head table: sort on header click, filter on typing.
  var table = document.getElementById("heads");
  if (table) {
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var texts = rows.map(function (r) { return r.textContent.toLowerCase(); });
    Array.prototype.forEach.call(table.querySelectorAll("thead button"), function (btn) {
      btn.addEventListener("click", function () {
        var col = +btn.getAttribute("data-col"), th = btn.parentNode;
        var dir = th.getAttribute("aria-sort") === "descending" ? 1 : -1;
        Array.prototype.forEach.call(table.querySelectorAll("thead th"), function (t) { t.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var keyed = rows.map(function (r, i) {
          var c = r.cells[col], v = c.getAttribute("data-v");
          return { r: r, i: i, num: v !== null, v: v === null ? c.textContent : (v === "" ? null : +v) };
        });
        keyed.sort(function (a, b) {
          if (a.v === null || b.v === null) { return a.v === b.v ? a.i - b.i : (a.v === null ? 1 : -1); }
          if (a.v < b.v) { return -dir; } if (a.v > b.v) { return dir; } return a.i - b.i;
        });
        var frag = document.createDocumentFragment();
        keyed.forEach(function (k) { frag.appendChild(k.r); });
        tbody.appendChild(frag);
      });
    });
    var filter = document.getElementById("filter"), count = document.getElementById("count");
    filter.addEventListener("input", function () {
      var words = filter.value.toLowerCase().split(/\s+/).filter(Boolean), n = 0;
      rows.forEach(function (r, i) {
        var ok = words.every(function (w) {  // "l3", "h7": that layer or head exactly; anything else: a substring
          var exact = /^([lh])(\d+)$/.exec(w);
          if (exact) { return r.cells[exact[1] === "l" ? 1 : 2].getAttribute("data-v") === exact[2]; }
          return texts[i].indexOf(w) >= 0;
        });
        r.hidden = !ok; if (ok) { n += 1; }
      });
      count.textContent = n + " of " + rows.length + " heads";
    });
  }

  // The model grid: colour by the chosen statistic (colours are precomputed in data-<stat>).
  var stat = document.getElementById("stat");
  if (stat) {
    stat.addEventListener("change", function () {
      var key = stat.value;
      Array.prototype.forEach.call(document.querySelectorAll("#grid a.cell"), function (a) {
        var p = (a.getAttribute("data-" + key) || "").split("|");
        a.style.background = p[0]; a.style.color = p[1]; a.textContent = p[2];
        a.classList.toggle("null", p[3] === "1");
        var label = a.getAttribute("aria-label").replace(/:.*$/, "");
        a.setAttribute("aria-label", label + ": " + stat.options[stat.selectedIndex].text.split(" — ")[0] + " " + p[2]);
      });
      Array.prototype.forEach.call(document.querySelectorAll(".legend"), function (l) {
        l.hidden = l.getAttribute("data-for") !== key;
      });
    });
  }

  // Head pages: arrow keys move between heads and layers.
  var keys = { ArrowLeft: "prev-head", ArrowRight: "next-head", ArrowUp: "prev-layer", ArrowDown: "next-layer" };
  if (document.getElementById("next-head") || document.getElementById("prev-head")) {
    document.addEventListener("keydown", function (e) {
      if (e.altKey || e.ctrlKey || e.metaKey || /INPUT|SELECT|TEXTAREA/.test(e.target.tagName)) { return; }
      var link = keys[e.key] && document.getElementById(keys[e.key]);
      if (link) { e.preventDefault(); window.location.href = link.href; }
    });
  }
})();
