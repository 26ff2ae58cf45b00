// The SearchWidget's front end (an anywidget ES module; no build step; served after painter.js).
// The browser keeps the drawing; Python searches. A finished stroke, an undo, a redo or a clear sends the
// canvas's painted pixels (one alpha byte per pixel of the model's view) as a binary buffer; Python
// answers by setting matches, mask_view, status or error and bumping `revision`.

const MOST_K = 1000; // typed in the box (a typo of 10000 would send as many tiles); Python may set more

function element(tag, className, parent, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function button(parent, text, title) {
  const node = element("button", "vfs-button", parent, text);
  node.type = "button";
  node.title = title;
  return node;
}

function render({ model, el }) {
  const root = element("div", "vfs-search", el);

  // --- tools --------------------------------------------------------------------------------------
  const bar = element("div", "vfs-toolbar", root);
  const brushTool = button(bar, "Brush", "Paint free-hand");
  const rectTool = button(bar, "Rectangle", "Drag a rectangle");
  const sizeLabel = element("label", "vfs-size", bar, "Size ");
  const size = element("input", "", sizeLabel);
  Object.assign(size, { type: "range", min: 2, max: 80, title: "Brush diameter in pixels of the model's view" });
  const sizeText = element("span", "vfs-size-value", sizeLabel);
  const history = element("span", "vfs-history", bar); // the painter's undo, redo and clear
  const kLabel = element("label", "vfs-k", bar, "k ");
  const k = element("input", "", kLabel);
  Object.assign(k, { type: "number", min: 1, max: MOST_K, step: 1, title: "How many matches to show" });

  // --- query, mask, status, matches ------------------------------------------------------------------
  const top = element("div", "vfs-top", root);
  const query = element("figure", "vfs-query", top);
  const stage = element("div", "vfs-stage", query);
  const view = element("img", "vfs-view", stage);
  view.alt = "the query as the model saw it";
  view.draggable = false;
  const canvas = element("canvas", "vfs-paint", stage);
  const queryCaption = element("figcaption", "", query);
  const maskFigure = element("figure", "vfs-mask", top);
  const maskImage = element("img", "", maskFigure);
  maskImage.alt = "the grid mask searched";
  const maskCaption = element("figcaption", "", maskFigure);
  const status = element("div", "vfs-status", root);
  const error = element("div", "vfs-error", root);
  error.setAttribute("role", "alert");
  const matches = element("div", "vfs-matches", root);

  const painter = createPainter(canvas, {
    settings: () => ({ tool: model.get("tool"), brush: model.get("brush"), grid: model.get("grid") }),
    changed: send,
    bar: history,
    keys: root,
    buttonClass: "vfs-button",
  });

  // This view's strokes not yet answered: busy until the last is, not at the first of several queued
  // behind a busy kernel (Python answers each in turn, a `revision` each).
  let pending = 0;

  function send(shapes) {
    const alpha = painter.alpha();
    try {
      model.set("shapes", shapes);
      model.save_changes();
      model.send({ type: "paint" }, undefined, [alpha.buffer]);
    } catch (failure) { // no kernel behind the widget (restarted, shut down): it would wait for ever
      status.textContent = "";
      error.textContent = "This widget has lost its kernel (restarted or shut down): run its cell again "
        + `to search (${failure.message || failure}).`;
      error.hidden = false;
      return;
    }
    pending += 1;
    root.classList.add("vfs-busy");
    status.textContent = shapes.length ? "Searching…" : "";
  }

  brushTool.addEventListener("click", () => { model.set("tool", "brush"); model.save_changes(); });
  rectTool.addEventListener("click", () => { model.set("tool", "rectangle"); model.save_changes(); });
  size.addEventListener("input", () => { model.set("brush", Number(size.value)); model.save_changes(); });
  const setK = () => { // a whole number 1..MOST_K; anything else gives the box its value back
    const value = Number(k.value);
    if (k.value.trim() === "" || !Number.isInteger(value) || value < 1 || value > MOST_K) {
      k.value = model.get("k");
      return;
    }
    if (value !== model.get("k")) { model.set("k", value); model.save_changes(); }
  };
  k.addEventListener("change", setK);
  k.addEventListener("keydown", (event) => {
    event.stopPropagation(); // typing a number is not a notebook shortcut (JupyterLab's 1-7, Enter)
    if (event.key === "Enter") { event.preventDefault(); setK(); }
  });

  // --- what Python says ------------------------------------------------------------------------------
  function showView() {
    const [height, width] = model.get("view_size");
    const [h, w] = model.get("grid");
    canvas.width = width;
    canvas.height = height;
    stage.style.width = "100%"; // of its figure: 320 px, less in a narrow output area (widget.css)
    stage.style.aspectRatio = `${width} / ${height}`;
    view.src = model.get("view");
    queryCaption.textContent = `Query as the model saw it (${width}×${height} px, ${h}×${w} feature grid)`;
    painter.redraw(); // resizing the canvas cleared it
  }
  function showTools() {
    const rectangle = model.get("tool") === "rectangle";
    brushTool.classList.toggle("vfs-active", !rectangle);
    rectTool.classList.toggle("vfs-active", rectangle);
    size.disabled = rectangle;
    size.value = model.get("brush");
    sizeText.textContent = `${model.get("brush")} px`;
    k.value = model.get("k");
  }
  function showAnswer() {
    pending = Math.max(0, pending - 1);
    root.classList.toggle("vfs-busy", pending > 0);
    const mask = model.get("mask_view");
    maskFigure.hidden = !mask;
    if (mask) maskImage.src = mask;
    maskCaption.textContent = model.get("mask_caption");
    status.textContent = model.get("status");
    error.textContent = model.get("error");
    error.hidden = !model.get("error");
    matches.replaceChildren(...model.get("matches").map((m) => {
      const tile = element("figure", "vfs-match");
      tile.dataset.index = m.index;
      const image = element("img", "", tile);
      image.src = m.image;
      image.alt = `Match ${m.rank}: image ${m.index}, score ${m.score.toFixed(2)}, best window ${m.window}`;
      const caption = element("figcaption", "", tile);
      element("b", "vfs-rank", caption, `${m.rank}.`);
      element("span", "vfs-score", caption, m.score.toFixed(3));
      for (const tag of [m.label, m.domain]) if (tag !== null) element("span", "vfs-tag", caption, tag);
      tile.title = `image ${m.index}: score ${m.score.toFixed(4)}`;
      return tile;
    }));
    matches.dataset.revision = model.get("revision");
  }

  model.on("change:view change:view_size change:grid", showView);
  model.on("change:tool change:brush change:k", showTools);
  model.on("change:shapes", () => painter.adopt(model.get("shapes")));
  model.on("change:revision", showAnswer);
  showView();
  showTools();
  painter.set(model.get("shapes"));
  showAnswer();
}

export default { render };
