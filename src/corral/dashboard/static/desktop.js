// The live desktop of a desktop sandbox: noVNC's RFB client over the dashboard's WebSocket, which carries it
// to an x11vnc the dashboard starts in the sandbox (POST .../desktop/start answers its VNC password).
import RFB from "../vendor/novnc/core/rfb.js";

const box = document.querySelector("[data-desktop]");
const openButton = document.querySelector("[data-desktop-open]");
const closeButton = document.querySelector("[data-desktop-close]");
const viewOnly = document.querySelector("[data-desktop-view-only]");
const status = document.getElementById("desktop-status");
let rfb = null;

function say(text) { status.textContent = text; }

function csrf() {
  return JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRF-Token"] || "";
}

async function open() {
  say("Starting the desktop's VNC server…");
  openButton.disabled = true;
  try {
    const answer = await fetch(box.dataset.desktop + "/start", {
      method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf() },
    });
    if (!answer.ok) {
      say("Could not start: " + (await answer.text()).replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim());
      return;
    }
    const { password } = await answer.json();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    say("Connecting…");
    rfb = new RFB(box, scheme + "//" + location.host + box.dataset.desktop, { credentials: { password } });
    rfb.scaleViewport = true;
    rfb.viewOnly = viewOnly.checked;
    rfb.addEventListener("connect", () => {
      say("Connected" + (rfb.viewOnly ? " (view only)" : ""));
      box.classList.add("live");
      openButton.hidden = true;
      closeButton.hidden = false;
      box.dataset.connected = "1";
    });
    rfb.addEventListener("disconnect", (event) => {
      say(event.detail.clean ? "Disconnected" : "The connection was lost");
      box.classList.remove("live");
      delete box.dataset.connected;
      openButton.hidden = false;
      openButton.textContent = "Show the desktop again";
      closeButton.hidden = true;
      rfb = null;
    });
    rfb.addEventListener("securityfailure", (event) => say("Refused: " + (event.detail.reason || "VNC authentication failed")));
  } catch (error) {
    say("Could not connect: " + error);
  } finally {
    openButton.disabled = false;
  }
}

if (box && openButton) {
  openButton.addEventListener("click", open);
  openButton.disabled = false;  // rendered disabled: a click before this module ran would do nothing
  closeButton.addEventListener("click", () => { if (rfb) rfb.disconnect(); });
  viewOnly.addEventListener("change", () => {
    if (rfb) {
      rfb.viewOnly = viewOnly.checked;
      say("Connected" + (rfb.viewOnly ? " (view only)" : ""));
    }
  });
}
