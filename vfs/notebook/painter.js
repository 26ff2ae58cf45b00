// The painter both front ends use: the notebook's SearchWidget and the dashboard's canvas (ui/canvas.py).
// Free-hand strokes and rectangles on a <canvas>, with undo, redo and clear. The shapes are plain JSON in
// canvas pixels, oldest first, so Python can store them and a new canvas can redraw them; the canvas's
// alpha is the paint. Neither front end can import a file beside it, so each is served after this one.

const PAINT = "rgb(255, 96, 0)"; // opaque on the canvas; the canvas is shown half transparent

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

// `settings()` gives {tool: "brush" | "rectangle", brush: diameter in canvas pixels} when a stroke starts;
// `changed(shapes)` runs after a finished stroke, an undo, a redo or a clear — not after `set`.
function createPainter(canvas, { settings, changed }) {
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let shapes = [];
  let undone = []; // what redo brings back, last undone last
  let current = null; // the stroke being drawn

  function redraw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    Object.assign(ctx, { fillStyle: PAINT, strokeStyle: PAINT, lineCap: "round", lineJoin: "round" });
    for (const shape of current ? [...shapes, current] : shapes) drawShape(ctx, shape);
  }

  function commit(next, redoable) {
    shapes = next;
    undone = redoable;
    redraw();
    changed(shapes);
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
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    const p = point(event);
    const { tool, brush } = settings();
    current = tool === "rectangle" ? { kind: "rect", box: [...p, ...p] } : { kind: "brush", size: brush, points: [p] };
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
    if (shape.kind !== "rect" || (x0 !== x1 && y0 !== y1)) commit([...shapes, shape], []);
    else redraw(); // a click with the rectangle tool paints nothing
  }
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);

  return {
    get shapes() {
      return shapes;
    },
    get canUndo() {
      return shapes.length > 0;
    },
    get canRedo() {
      return undone.length > 0;
    },
    set(next) {
      shapes = next.slice();
      undone = [];
      current = null;
      redraw();
    },
    undo() {
      if (shapes.length) commit(shapes.slice(0, -1), [...undone, shapes[shapes.length - 1]]);
    },
    redo() {
      if (undone.length) commit([...shapes, undone[undone.length - 1]], undone.slice(0, -1));
    },
    clear() {
      commit([], []);
    },
    redraw,
    alpha() {
      const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      const alpha = new Uint8Array(canvas.width * canvas.height);
      for (let i = 0; i < alpha.length; i++) alpha[i] = rgba[4 * i + 3];
      return alpha;
    },
  };
}
