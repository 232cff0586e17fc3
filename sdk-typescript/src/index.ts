/**
 * flux-client: the TypeScript SDK for Flux.
 *
 * This foundation release exports the shared error table and the package version; the client,
 * producer, consumer and consumer groups come with their issues.
 *
 * @packageDocumentation
 */

export {
  FLUX_CLIENT_ERRORS,
  FLUX_ERROR_CODES,
  FLUX_ERRORS,
  type FluxClientErrorEntry,
  type FluxClientErrorName,
  type FluxClientErrorReason,
  type FluxErrorCode,
  type FluxErrorEntry,
  type FluxErrorName,
  type FluxErrorReason,
  type GrpcCodeName,
  REASON_METADATA_KEY,
} from "./gen/errors.js";

/** Version of this package. */
export const VERSION = "0.1.0";

/** Version of the Liftbridge client API that Flux is wire-compatible with. */
export const LIFTBRIDGE_API_VERSION = "1.9.0";
