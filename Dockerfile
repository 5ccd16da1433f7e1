# Reproduces the pviommu environment on Debian 12 with the project's own
# provisioning scripts (./run -> qemu-scripts/*), then runs the demo.
FROM debian:bookworm
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /pviommu
COPY . .
RUN ./run setup
ENTRYPOINT ["./run"]
CMD ["demo"]
