from twisted.application.service import ServiceMaker

dockerRouter = ServiceMaker(
    "docker-router",
    "dockerrouter.service.tap",
    "Route /var/run/docker.sock to each user's own rootless Docker daemon.",
    "docker-router",
)
