const express = require("express");
const app = express();
app.get("*", (req, res) => res.type("text").send(`hello from express at ${req.url}\n`));
app.listen(Number(process.env.PORT || 3000), "127.0.0.1");
