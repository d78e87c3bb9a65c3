module servicecaoperator/benches/gokeys

go 1.22
