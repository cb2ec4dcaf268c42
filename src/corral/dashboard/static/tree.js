// The checkpoint tree page: brings the focused node (?focus=...) into view once the picture is drawn.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", () => {
    const focused = document.querySelector(".node-card.focused");
    if (focused) focused.scrollIntoView({ block: "center", inline: "center" });
  });
})();
