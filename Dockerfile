# Release image for kms-plugin and kmsctl.
# cgo stays on: the pkcs11 backend loads the vendor's PKCS#11 library with
# dlopen, so the runtime image keeps glibc (distroless/base, not static).
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=1 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/ ./cmd/kms-plugin ./cmd/kmsctl

FROM gcr.io/distroless/base-debian12:nonroot
COPY --from=build /out/kms-plugin /out/kmsctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kms-plugin"]
CMD ["serve", "--config", "/etc/kms-plugin/config.yaml"]
