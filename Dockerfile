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
ARG COMMIT=unknown
RUN CGO_ENABLED=1 go build -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/ ./cmd/kms-plugin ./cmd/kmsctl

# Pinned by digest, so a rebuild uses the bytes that were reviewed. No
# registry is reachable where this line was written: the digest is the one
# several public projects pin for this tag, not one resolved here. Refresh it
# before a release with `crane digest gcr.io/distroless/cc-debian12:nonroot`
# (or `docker buildx imagetools inspect ...`).
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /out/kms-plugin /out/kmsctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kms-plugin"]
CMD ["serve", "--config", "/etc/kms-plugin/config.yaml"]
