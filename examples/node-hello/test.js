const assert = require("assert");
assert.strictEqual(1 + 1, 2);
console.log("1 + 1 is still 2");
