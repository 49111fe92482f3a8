// Give the terminal the keyboard as soon as it exists, so keys work without a click first.
(function () {
  "use strict";
  function focusTerminal() {
    var input = document.querySelector("#terminal textarea");
    if (input && document.activeElement !== input) {
      input.focus();
      return true;
    }
    return !!input;
  }
  if (focusTerminal()) return;
  var watcher = new MutationObserver(function () {
    if (focusTerminal()) watcher.disconnect();
  });
  watcher.observe(document.documentElement, { childList: true, subtree: true });
  window.addEventListener("focus", focusTerminal);
})();
