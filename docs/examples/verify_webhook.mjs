// Verify a Flashgate webhook: Node 18+, node:crypto only. Copy `verify` into your app.
//
//     WEBHOOK_SECRET='whsec_...' node verify_webhook.mjs "$FLASHGATE_SIGNATURE" < body.json
//
// exits 0 when the Flashgate-Signature header is valid for the body, 1 when it is not.
import { createHmac, timingSafeEqual } from "node:crypto";
import { pathToFileURL } from "node:url";

const TOLERANCE_S = 300; // refuse deliveries signed more than 5 minutes from now (replays)

// secret: the channel's webhook_secret exactly as Flashgate showed it;
// body: the raw request body as a Buffer (before any JSON parsing);
// signatureHeader: the Flashgate-Signature header, `t=<unix s>,v1=<hex>[,v1=<hex>...]`.
export function verify(secret, body, signatureHeader, nowS = Date.now() / 1000) {
  const timestamps = [];
  const signatures = [];
  for (const item of signatureHeader.split(",")) {
    const [name, ...rest] = item.trim().split("=");
    if (name === "t") timestamps.push(rest.join("="));
    else if (name === "v1") signatures.push(rest.join("="));
  }
  if (timestamps.length !== 1 || !/^[0-9]+$/.test(timestamps[0])) return false;
  const timestamp = Number(timestamps[0]);
  if (Math.abs(nowS - timestamp) > TOLERANCE_S) return false;
  const expected = createHmac("sha256", Buffer.from(secret, "utf8"))
    .update(`${timestamp}.`)
    .update(body)
    .digest();
  // Several v1 while Flashgate rotates the secret: any one may match.
  return signatures.some((sig) => {
    const given = Buffer.from(sig, "hex");
    return sig.length === 64 && given.length === expected.length && timingSafeEqual(given, expected);
  });
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const ok = verify(process.env.WEBHOOK_SECRET, Buffer.concat(chunks), process.argv[2]);
  console.log(ok ? "valid" : "INVALID");
  process.exit(ok ? 0 : 1);
}
