# Release image for kms-plugin and kmsctl, for builders who can reach a
# registry. `make image` builds the same image as an OCI layout without a
# container engine or registry (docs/image.md); keep the two in step.
# cgo stays on: the pkcs11 backend loads the vendor's PKCS#11 library with
# dlopen, so the runtime image keeps glibc; distroless/cc adds libgcc_s and
# libstdc++, which vendor PKCS#11 modules link against.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=1 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/ ./cmd/kms-plugin ./cmd/kmsctl

# TODO(release): pin this by digest before a release; no registry was reachable
# when this line was written, so the digest is not filled in here. Resolve it
# with `crane digest gcr.io/distroless/cc-debian12:nonroot` (or
# `docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot`)
# and write the line as:
#   FROM gcr.io/distroless/cc-debian12:nonroot@sha256:<digest>
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kms-plugin /out/kmsctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kms-plugin"]
CMD ["serve", "--config", "/etc/kms-plugin/config.yaml"]
