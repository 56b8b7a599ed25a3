// A page whose text comes from message.js; Fast Refresh swaps it in place (no reload) when
// message.js changes.
import { message } from "./message";

export default function Page() {
  return <p id="app">{message}</p>;
}
