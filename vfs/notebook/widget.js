// The SearchWidget's front end (an anywidget ES module; no build step).
// The browser keeps the drawing; Python searches. A finished stroke, an undo or a clear sends the
// canvas's painted pixels (one alpha byte per pixel of the model's view) as a binary buffer; Python
// answers by setting matches, mask_view, status or error and bumping `revision`.

const DISPLAY_PX = 320; // the query's on-screen width; the canvas itself has the view's pixels
const PAINT = "rgb(255, 96, 0)"; // opaque on the canvas; the canvas is shown half transparent

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

function drawShape(ctx, shape) {
  if (shape.kind === "rect") {
    const [x0, y0, x1, y1] = shape.box;
    ctx.fillRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    return;
  }
  const points = shape.points;
  ctx.lineWidth = shape.size;
  if (points.length === 1) {
    ctx.beginPath();
    ctx.arc(points[0][0], points[0][1], shape.size / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(points[0][0], points[0][1]);
  for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
  ctx.stroke();
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
  const undo = button(bar, "Undo", "Remove the last stroke");
  const clear = button(bar, "Clear", "Remove every stroke");
  const kLabel = element("label", "vfs-k", bar, "k ");
  const k = element("input", "", kLabel);
  Object.assign(k, { type: "number", min: 1, max: 200, step: 1, title: "How many matches to show" });

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

  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let shapes = [];
  let current = null; // the stroke being drawn

  function redraw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    Object.assign(ctx, { fillStyle: PAINT, strokeStyle: PAINT, lineCap: "round", lineJoin: "round" });
    for (const shape of current ? [...shapes, current] : shapes) drawShape(ctx, shape);
  }

  function send() {
    const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const alpha = new Uint8Array(canvas.width * canvas.height);
    for (let i = 0; i < alpha.length; i++) alpha[i] = rgba[4 * i + 3];
    model.set("shapes", shapes);
    model.save_changes();
    root.classList.add("vfs-busy");
    status.textContent = shapes.length ? "Searching…" : "";
    model.send({ type: "paint" }, undefined, [alpha.buffer]);
  }

  function point(event) {
    const box = canvas.getBoundingClientRect();
    return [
      ((event.clientX - box.left) / box.width) * canvas.width,
      ((event.clientY - box.top) / box.height) * canvas.height,
    ];
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    canvas.setPointerCapture(event.pointerId);
    const p = point(event);
    current = model.get("tool") === "rectangle"
      ? { kind: "rect", box: [...p, ...p] }
      : { kind: "brush", size: model.get("brush"), points: [p] };
    redraw();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!current) return;
    const p = point(event);
    if (current.kind === "rect") current.box = [current.box[0], current.box[1], ...p];
    else current.points.push(p);
    redraw();
  });
  function finish() {
    if (!current) return;
    const shape = current;
    current = null;
    const [x0, y0, x1, y1] = shape.box || [];
    const paints = shape.kind !== "rect" || (x0 !== x1 && y0 !== y1); // a click with the rectangle tool does not
    if (paints) shapes = [...shapes, shape];
    redraw();
    if (paints) send();
  }
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);

  undo.addEventListener("click", () => {
    if (!shapes.length) return;
    shapes = shapes.slice(0, -1);
    redraw();
    send();
  });
  clear.addEventListener("click", () => {
    shapes = [];
    redraw();
    send();
  });
  brushTool.addEventListener("click", () => { model.set("tool", "brush"); model.save_changes(); });
  rectTool.addEventListener("click", () => { model.set("tool", "rectangle"); model.save_changes(); });
  size.addEventListener("input", () => { model.set("brush", Number(size.value)); model.save_changes(); });
  k.addEventListener("change", () => { model.set("k", Math.max(1, Math.round(Number(k.value)))); model.save_changes(); });

  // --- what Python says ------------------------------------------------------------------------------
  function showView() {
    const [height, width] = model.get("view_size");
    const [h, w] = model.get("grid");
    canvas.width = width;
    canvas.height = height;
    stage.style.width = `${DISPLAY_PX}px`;
    stage.style.aspectRatio = `${width} / ${height}`;
    view.src = model.get("view");
    queryCaption.textContent = `Query as the model saw it (${width}×${height} px, ${h}×${w} feature grid)`;
    redraw();
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
  function showShapes() {
    shapes = model.get("shapes").slice();
    redraw();
  }
  function showAnswer() {
    root.classList.remove("vfs-busy");
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
      image.alt = `image ${m.index}, its best window outlined`;
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
  model.on("change:shapes", showShapes);
  model.on("change:revision", showAnswer);
  showView();
  showTools();
  showShapes();
  showAnswer();
}

export default { render };
