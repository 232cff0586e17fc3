// Spot checks of the generated TypeScript against the Liftbridge v1.9.0 wire contract. The full
// field-by-field check lives in proto/tests/test_wire_compat.py; this one guards what the
// TypeScript generator could get wrong on its own: service name, streaming kinds and int64 typing.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { API, MessageSchema, StartPosition } from "./gen/flux_proto/api_pb.js";

describe("generated proto.API", () => {
  it("is the Liftbridge service with the right streaming kinds", () => {
    assert.equal(API.typeName, "proto.API");
    assert.equal(API.method.subscribe.methodKind, "server_streaming");
    assert.equal(API.method.publishAsync.methodKind, "bidi_streaming");
    assert.equal(API.method.publish.methodKind, "unary");
    // Liftbridge's 16 RPCs plus Flux's batched data path and consumer-group extensions.
    assert.equal(API.method.initProducer.methodKind, "unary");
    assert.equal(API.method.publishBatch.methodKind, "bidi_streaming");
    assert.equal(API.method.subscribeBatch.methodKind, "server_streaming");
    assert.equal(API.method.watchConsumerGroupAssignments.methodKind, "server_streaming");
    assert.equal(API.method.describeConsumerGroup.methodKind, "unary");
    assert.equal(Object.keys(API.method).length, 23);
  });

  it("keeps int64 as bigint, so offsets above 2^53 survive", () => {
    const message = create(MessageSchema, { offset: 9_007_199_254_740_993n, partition: 1 });
    assert.equal(typeof message.offset, "bigint");
    // field 1 (offset), varint: tag 0x08 followed by the 8-byte varint of 2^53 + 1.
    assert.deepEqual(
      toBinary(MessageSchema, message).subarray(0, 9),
      Uint8Array.of(0x08, 0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10),
    );
    assert.equal(StartPosition.NEW_ONLY, 0);
  });
});
