// A dev-server page whose text comes from message.js and is swapped in place by Vite's HMR
// (no reload) when message.js changes.
import { message } from "./message.js";

document.querySelector("#app").textContent = message;

if (import.meta.hot) {
  import.meta.hot.accept("./message.js", (next) => {
    if (next) document.querySelector("#app").textContent = next.message;
  });
}
