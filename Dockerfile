# One image for every boxoffice service. Built with EXTRAS="[local]" it also carries the localstripe
# emulator (the compose file's dev profile); the services' image never does.
FROM python:3.11-slim-bookworm
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml constraints.txt README.md ./
COPY libs ./libs
COPY services ./services
RUN pip install -c constraints.txt ".${EXTRAS}" \
    && groupadd --system --gid 10001 boxoffice \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app boxoffice \
    && mkdir -p /var/spool/boxoffice && chown 10001:10001 /var/spool/boxoffice

# numeric, so that a runtime (Kubernetes' runAsNonRoot) can tell it is not root without /etc/passwd
USER 10001:10001
ENTRYPOINT ["boxoffice"]
CMD ["--help"]
