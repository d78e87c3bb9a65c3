module github.com/service-ca-operator/service-ca-operator/tests/tlsclient

go 1.26.0
