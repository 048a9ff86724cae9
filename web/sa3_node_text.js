// Shows the text our nodes return ({"ui": {"text": [...]}}: a run's status, an encode report, what Run Control did,
// a generation's warnings) on the node itself; an empty list takes it off. ComfyUI's frontend keeps such text in the
// history only; without this the user sees nothing.

import { app } from "../../scripts/app.js";

export const RESULT_WIDGET = "sa3_result";

let comfyWidgets;  // ComfyUI's widget constructors: a multiline, read-only text box like its own nodes'
async function widgetMakers() {
  if (comfyWidgets === undefined) {
    try {
      comfyWidgets = (await import("../../scripts/widgets.js")).ComfyWidgets ?? null;
    } catch {
      comfyWidgets = null;  // a frontend without the legacy module: LiteGraph's plain text widget
    }
  }
  return comfyWidgets;
}

/** Put `text` (a string or a list of lines) into the node's result box, made on first use and never saved with
 * the workflow (it is output, not an input). */
export async function showText(node, text) {
  const value = Array.isArray(text) ? text.join("\n") : String(text ?? "");
  let widget = node.widgets?.find((w) => w.name === RESULT_WIDGET);
  if (!widget) {
    const makers = await widgetMakers();
    widget = makers?.STRING
      ? makers.STRING(node, RESULT_WIDGET, ["STRING", { multiline: true }], app).widget
      : node.addWidget("text", RESULT_WIDGET, value, () => {}, {});
    widget.serialize = false;  // not in widgets_values: a reloaded workflow's inputs keep their places
    widget.options = { ...(widget.options || {}), serialize: false };
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = "0.85";
    }
  }
  widget.value = value;
  // room for the text: a multiline box takes the node's spare height, so grow the node to about one line per
  // 15 px of its wrapped text (at most ~12 lines; the box scrolls beyond), never shrinking what the user sized
  const [minWidth, minHeight] = node.computeSize?.() ?? node.size ?? [0, 0];
  const width = Math.max(node.size?.[0] ?? 0, minWidth, 360);
  const wrapped = value.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / (width / 7))), 0);
  const height = Math.max(node.size?.[1] ?? 0, minHeight + Math.min(12, wrapped) * 15);
  node.setSize?.([width, height]);
  app.graph?.setDirtyCanvas?.(true, true);
  return widget;
}

/** Take the result box off the node (a run that had nothing to say after one that warned); its size stays, as the
 * user may have set it. */
export function clearText(node) {
  const i = node.widgets?.findIndex((w) => w.name === RESULT_WIDGET) ?? -1;
  if (i < 0) return;
  const [widget] = node.widgets.splice(i, 1);
  widget.onRemove?.();  // a DOM widget's text box leaves the page with it
  app.graph?.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "sa3_lora_studio.node_text",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name ?? "").startsWith("SA3")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text);
      else if (Array.isArray(message?.text)) clearText(this);  // e.g. a generation without warnings this time
    };
  },
});
