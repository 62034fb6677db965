#pragma once
// stand-in: torch's CMake writes the real one; the CPU wheel has none
