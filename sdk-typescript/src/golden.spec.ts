// Decodes the golden message bytes written by Python's protobuf (conformance/golden/, made by
// proto/codegen/golden.py), checks the decoded message against Python's canonical JSON, and
// re-encodes it: the bytes must be identical (for the samples with multi-entry maps, whose
// entry order protobuf leaves unspecified, the same length and content). This proves both SDKs read and write the same wire
// format, including negative int64, uint64 above 2^63, maps and packed repeated fields.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { createRegistry, fromBinary, type JsonValue, toBinary, toJson } from "@bufbuild/protobuf";
import { file_flux_proto_api } from "./gen/flux_proto/api_pb.js";

interface GoldenSample {
  readonly name: string;
  readonly type: string;
  readonly file: string;
  readonly json: JsonValue;
  /** False when the sample has maps with several entries, whose wire order is unspecified. */
  readonly byte_exact: boolean;
}

const goldenDir = new URL("../../conformance/golden/", import.meta.url);
const index = JSON.parse(readFileSync(new URL("index.json", goldenDir), "utf8")) as {
  samples: GoldenSample[];
};
const registry = createRegistry(file_flux_proto_api);

describe("golden messages from Python", () => {
  it("has samples to check", () => {
    assert.ok(index.samples.length >= 10, `only ${String(index.samples.length)} samples`);
  });

  for (const sample of index.samples) {
    it(`${sample.name} (${sample.type}) decodes, matches Python's JSON and re-encodes identically`, () => {
      const schema = registry.getMessage(sample.type);
      assert.ok(schema, `unknown message type ${sample.type}`);
      const bytes = new Uint8Array(readFileSync(new URL(sample.file, goldenDir)));
      const message = fromBinary(schema, bytes);
      assert.deepEqual(toJson(schema, message), sample.json);
      const reencoded = toBinary(schema, message);
      if (sample.byte_exact) {
        assert.deepEqual(reencoded, bytes);
      } else {
        assert.equal(reencoded.length, bytes.length);
        assert.deepEqual(toJson(schema, fromBinary(schema, reencoded)), sample.json);
      }
    });
  }
});
