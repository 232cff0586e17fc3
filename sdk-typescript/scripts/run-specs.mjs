// Runs every compiled spec (dist/**/*.spec.js) with Node's built-in test runner. Node 20's
// `node --test` has no glob support, so the files are listed here; no spec found is a failure.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { join } from "node:path";

function findSpecs(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return findSpecs(path);
    return entry.name.endsWith(".spec.js") ? [path] : [];
  });
}

const specs = findSpecs("dist").sort();
if (specs.length === 0) {
  console.error("run-specs: no dist/**/*.spec.js found; did tsc run?");
  process.exit(1);
}
const result = spawnSync(process.execPath, ["--test", ...specs], { stdio: "inherit" });
process.exit(result.status ?? 1);
