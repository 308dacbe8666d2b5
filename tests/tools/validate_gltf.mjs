// Validate one glTF/GLB file with the Khronos glTF-Validator and print its JSON report.
//
//   node tests/tools/validate_gltf.mjs FILE [VALIDATOR_DIR]
//
// VALIDATOR_DIR is the installed npm package (default: .tools/node_modules/gltf-validator in the
// checkout). Exit code: 0 when the report has no errors, 1 when it has errors, 2 on usage or I/O
// problems. External resources (.gltf with separate files) are resolved next to FILE.
import { readFile } from "node:fs/promises";
import path from "node:path";
import { pathToFileURL, fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const [file, validatorDir] = process.argv.slice(2);
if (!file) {
  console.error("usage: node validate_gltf.mjs FILE [VALIDATOR_DIR]");
  process.exit(2);
}
const dir = validatorDir || path.join(here, "..", "..", ".tools", "node_modules", "gltf-validator");

let validator;
try {
  validator = await import(pathToFileURL(path.join(dir, "module.mjs")).href);
} catch (err) {
  console.error(`cannot load gltf-validator from ${dir}: ${err.message} (run: python3 build.py setup)`);
  process.exit(2);
}

let bytes;
try {
  bytes = new Uint8Array(await readFile(file));
} catch (err) {
  console.error(`cannot read ${file}: ${err.message}`);
  process.exit(2);
}

try {
  const report = await validator.validateBytes(bytes, {
    uri: path.basename(file),
    maxIssues: 0, // all of them
    writeTimestamp: false,
    externalResourceFunction: async (uri) =>
      new Uint8Array(await readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)))),
  });
  console.log(JSON.stringify(report, null, 1));
  process.exit(report.issues.numErrors > 0 ? 1 : 0);
} catch (err) {
  console.error(`validation failed for ${file}: ${err}`);
  process.exit(2);
}
