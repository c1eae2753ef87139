// Prints an import map for @sentry/browser's ES modules, so an unmodified page can load the SDK
// from node_modules without a bundler: every bare specifier its modules import, resolved as Node
// resolves it (package exports), as a URL under /node_modules/.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
const seen = new Set();
const imports = {};
const queue = [fileURLToPath(import.meta.resolve("@sentry/browser"))];
const bare = /(?:from|import)\s*['"]([^./'"][^'"]*)['"]/g;
while (queue.length) {
  const file = queue.pop();
  if (seen.has(file)) continue;
  seen.add(file);
  const text = readFileSync(file, "utf8");
  for (const m of text.matchAll(/(?:from|import)\s*['"](\.[^'"]+)['"]/g)) {
    queue.push(join(file, "..", m[1]));
  }
  for (const m of text.matchAll(bare)) {
    const spec = m[1];
    if (imports[spec]) continue;
    try {
      const target = fileURLToPath(import.meta.resolve(spec, "file://" + file));
      imports[spec] = "/" + relative(here, target).split("\\").join("/");
      queue.push(target);
    } catch { /* optional peer (e.g. unleash-proxy-client): never loaded */ }
  }
}
imports["@sentry/browser"] = "/" + relative(here, fileURLToPath(import.meta.resolve("@sentry/browser")));
process.stdout.write(JSON.stringify({ imports }));
