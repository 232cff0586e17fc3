// The error table generated from proto/src/flux_proto/errors.json is complete and consistent.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { FLUX_CLIENT_ERRORS, FLUX_ERROR_CODES, FLUX_ERRORS, REASON_METADATA_KEY } from "./index.js";

describe("error table", () => {
  it("has unique names and reasons", () => {
    const names = FLUX_ERRORS.map((entry) => entry.name);
    const reasons = FLUX_ERRORS.map((entry) => entry.reason);
    assert.equal(new Set(names).size, names.length);
    assert.equal(new Set(reasons).size, reasons.length);
    assert.equal(REASON_METADATA_KEY, "flux-reason");
  });

  it("keeps Liftbridge's codes for conditions clients match on", () => {
    const byName = new Map(FLUX_ERRORS.map((entry) => [entry.name, entry]));
    assert.equal(byName.get("NOT_LEADER")?.grpcCode, "FAILED_PRECONDITION");
    assert.equal(byName.get("NOT_LEADER")?.grpcCodeNumber, 9);
    assert.equal(byName.get("STOP_REACHED")?.liftbridgeMessage, "Stop offset reached");
    assert.equal(byName.get("SLOW_CONSUMER")?.grpcCode, "UNAVAILABLE");
  });

  it("lists every broker and client-side name exactly once in FLUX_ERROR_CODES", () => {
    const expected = [...FLUX_ERRORS, ...FLUX_CLIENT_ERRORS].map((entry) => entry.name);
    assert.deepEqual(FLUX_ERROR_CODES, expected);
    assert.equal(new Set(FLUX_ERROR_CODES).size, FLUX_ERROR_CODES.length);
    const reasons = [...FLUX_ERRORS, ...FLUX_CLIENT_ERRORS].map((entry) => entry.reason);
    assert.equal(new Set<string>(reasons).size, reasons.length);
    assert.ok(FLUX_ERROR_CODES.includes("CLOSED"));
    assert.ok(FLUX_ERROR_CODES.includes("NOT_LEADER"));
  });
});
